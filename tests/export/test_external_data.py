"""Graphs with their weights in external-data files (what every graph above 2 GB gets; forced here on a
tiny model with ``--external-data``): export and validation, sha256 in the manifest, ONNX Runtime runs
them with the same tokens as the inline bundle, a changed data byte is refused, and TensorRT's parser
finds the data beside the graph."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import BUNDLE_CFG
from vtprune.api import export_bundle, open_runner
from vtprune.errors import BundleError
from vtprune.export.bundle import ExportConfig
from vtprune.manifest import read_manifest

PROMPT = "what color is the shape ?"


@pytest.fixture(scope="module")
def external_bundle(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """Exported as a real-size model is: the 1 GB threshold lowered to 1 KB, so every graph's weights are
    streamed to its data file by the exporter (``--external-data`` then has nothing left to move)."""
    from vtprune.export import onnx_io

    out = tmp_path_factory.mktemp("external") / "b"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_io, "EXTERNAL_ABOVE", 1024)
        export_bundle("tiny-llava", BUNDLE_CFG, ExportConfig(external_data=True), out, cache_dir)
    return out


def test_external_data_flag_moves_an_inline_graphs_weights(bundles, tmp_path):
    import onnx

    from vtprune.export.onnx_io import external_locations, externalize

    path = tmp_path / "embed.onnx"
    shutil.copy(bundles["tiny-llava"] / "embed.onnx", path)
    before = onnx.load(str(path))
    assert externalize(path) == ["embed.onnx", "embed.onnx.data"] == externalize(path)  # once
    after = onnx.load(str(path))  # external data read back
    assert external_locations(onnx.load(str(path), load_external_data=False)) == ["embed.onnx.data"]
    assert [onnx.numpy_helper.to_array(t).tobytes() for t in after.graph.initializer] == [
        onnx.numpy_helper.to_array(t).tobytes() for t in before.graph.initializer]


def test_every_graph_keeps_its_weights_beside_it(external_bundle):
    import onnx

    from vtprune.export.onnx_io import external_locations, tensor_bytes

    manifest = read_manifest(external_bundle)
    assert manifest["export"]["external_data"] is True
    assert all(c["ok"] for c in manifest["validation"]["checks"])
    for name, graph in manifest["graphs"].items():
        assert graph["files"] == [f"{name}.onnx", f"{name}.onnx.data"], name
        model = onnx.load(str(external_bundle / f"{name}.onnx"), load_external_data=False)
        assert external_locations(model) == [f"{name}.onnx.data"] and tensor_bytes(model) < 4096, name
        assert len(manifest["files"][f"{name}.onnx.data"]) == 64  # its sha256


def test_runs_like_the_inline_bundle(external_bundle, bundles, scene):
    from vtprune.runtime.generate import generate

    tokens = []
    for bundle in (external_bundle, bundles["tiny-llava"]):
        with open_runner(bundle) as runner:
            tokens.append(generate(runner, scene, PROMPT, max_new_tokens=6).token_ids)
    assert tokens[0] == tokens[1]  # same graphs, same CPU: only where the weights are stored differs


def test_a_changed_data_file_is_refused(external_bundle, tmp_path):
    from vtprune.backends.ort import OrtVlm

    copy = tmp_path / "b"
    shutil.copytree(external_bundle, copy)
    data = copy / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="decoder.onnx.data"):
        OrtVlm(copy)


def test_reused_language_model_brings_its_data_files(external_bundle, tmp_path, cache_dir):
    import dataclasses

    out = tmp_path / "reuse"
    cfg = dataclasses.replace(BUNDLE_CFG, method="uniform")
    export_bundle("tiny-llava", cfg, ExportConfig(external_data=True, reuse_lm_from=str(external_bundle)), out,
                  cache_dir)  # fmt: skip
    manifest = read_manifest(out)
    for name in ("embed", "decoder"):
        assert manifest["files"][f"{name}.onnx.data"] == read_manifest(external_bundle)["files"][f"{name}.onnx.data"]


@pytest.mark.trt
def test_tensorrt_parser_finds_the_data_beside_the_graph(external_bundle, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX builds engines on the CPU")
    from vtprune.cli import main

    copy = tmp_path / "b"
    shutil.copytree(external_bundle, copy)
    assert main(["build", str(copy), "--graphs", "decoder", "--max-seq", "64", "--target", "sm89"]) == 0
    meta = json.loads((copy / "decoder.engine.json").read_text())
    assert (copy / "decoder.engine").stat().st_size > 0 and meta["onnx_sha256"]
