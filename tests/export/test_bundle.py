"""Bundles: export + validation per family, ORT runtime parity, integrity, atomicity, TensorRT parse/build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BUNDLE_CFG as CFG
from tests.conftest import FAMILIES
from vtprune.api import export_bundle
from vtprune.config import PruneConfig
from vtprune.errors import AccuracyError, BundleError
from vtprune.export.bundle import ExportConfig
from vtprune.manifest import read_manifest
from vtprune.runtime.pipeline import PrunedVlm

PROMPT = "what color is the shape ?"


@pytest.fixture(params=sorted(FAMILIES))
def bundle(request, bundles) -> Path:
    return bundles[request.param]


def test_manifest_records_settings_files_and_validation(bundle):
    m = read_manifest(bundle)
    assert m["prune"]["method"] == "gprune" and isinstance(m["prune"]["keep"], int)
    assert m["keep_requested"] == 0.25
    assert {"vision.onnx", "embed.onnx", "decoder.onnx", "vision.inlined.onnx"} <= set(m["files"])
    assert any(f.startswith("processor/") for f in m["files"])
    assert all(r["ok"] for r in m["validation"]["checks"]) and len(m["validation"]["checks"]) == 6
    assert set(m["graphs"]) == {"vision", "embed", "decoder"} and m["tools"]["onnxruntime"] != "absent"
    assert not list(bundle.parent.glob(f".{bundle.name}*")), "temp dirs left next to the bundle"


def test_vision_graph_holds_the_pruning_ops_with_function_bodies(bundle):
    import onnx

    model = onnx.load(str(bundle / "vision.onnx"))
    custom = {(n.domain, n.op_type) for n in model.graph.node if n.domain == "vtprune"}
    assert custom == {("vtprune", "GraphPropagate"), ("vtprune", "TopKRoute")}
    assert {f.name for f in model.functions} == {"GraphPropagate", "TopKRoute"}
    assert not any(n.op_type == "Loop" for f in model.functions for n in f.node)
    inlined = onnx.load(str(bundle / "vision.inlined.onnx"))
    assert not inlined.functions and not any(n.domain == "vtprune" for n in inlined.graph.node)


def test_inlined_vision_graph_gives_identical_outputs(bundle):
    from vtprune.backends.ort import OrtVlm, make_session

    vlm = OrtVlm(bundle)
    inputs = vlm.inputs(vlm._fit_image(_image()), PROMPT)
    feeds = vlm.vision_feeds(inputs)
    a = vlm.sessions["vision"].run(None, feeds)
    b = make_session(bundle / "vision.inlined.onnx").run(None, feeds)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def _image():
    from vtprune.images import scene_image

    return scene_image().resize((200, 300))  # not the export sample


def test_ort_generation_matches_pytorch(bundle, tiny_dirs):
    from vtprune.backends.ort import OrtVlm
    from vtprune.models import load_vlm

    vlm = OrtVlm(bundle)
    image = vlm._fit_image(_image())
    cfg = PruneConfig.from_dict(read_manifest(bundle)["prune"])
    ref = PrunedVlm(load_vlm(tiny_dirs[bundle.name]), cfg).generate(image, PROMPT, max_new_tokens=12)
    got = vlm.generate(image, PROMPT, max_new_tokens=12)
    assert got.token_ids == ref.token_ids and got.answer == ref.answer
    assert (got.visual_tokens_kept, got.prefill_tokens) == (ref.visual_tokens_kept, ref.prefill_tokens)
    assert got.flops.prefill_macs_pruned == ref.flops.prefill_macs_pruned
    assert {"preprocess", "vision", "embed", "prefill", "decode"} == set(got.timings_ms)


def test_cli_run_on_a_bundle_matches_the_pytorch_path(bundles, cache_dir, png, capsys):
    from vtprune.cli import main

    keep = str(read_manifest(bundles["tiny-llava"])["prune"]["keep"])
    assert main(["run", str(bundles["tiny-llava"]), "--image", str(png), "--prompt", PROMPT, "--json"]) == 0
    ort_out = json.loads(capsys.readouterr().out)
    args = ["run", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--keep", keep]
    assert main([*args, "--image", str(png), "--prompt", PROMPT, "--json"]) == 0
    torch_out = json.loads(capsys.readouterr().out)
    assert ort_out["answer"] == torch_out["answer"] and ort_out["token_ids"] == torch_out["token_ids"]


def test_tampered_bundle_is_refused(bundles, tmp_path, png, capsys):
    from vtprune.cli import main

    copy = tmp_path / "b"
    shutil.copytree(bundles["tiny-llava"], copy)
    data = bytearray((copy / "embed.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "embed.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="embed.onnx does not match its sha256"):
        read_manifest(copy)
    assert main(["run", str(copy), "--image", str(png), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0]
    (copy / "embed.onnx").unlink()
    with pytest.raises(BundleError, match="embed.onnx is missing"):
        read_manifest(copy)


def test_existing_output_needs_force_and_non_bundles_are_never_replaced(tmp_path, cache_dir):
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match="--force"):
        export_bundle("tiny-llava", CFG, ExportConfig(), target, cache_dir)
    with pytest.raises(BundleError, match="not a vtprune bundle"):
        export_bundle("tiny-llava", CFG, ExportConfig(force=True), target, cache_dir)
    assert (target / "precious.txt").read_text() == "keep me"


def test_failed_validation_leaves_nothing_behind(tmp_path, cache_dir, monkeypatch):
    import vtprune.check.validate as validate

    monkeypatch.setitem(validate.ATOL, "logits", -1.0)  # no difference can pass
    with pytest.raises(AccuracyError) as info:
        export_bundle("tiny-llava", CFG, ExportConfig(), tmp_path / "out", cache_dir)
    assert any(row["check"] == "prefill logits" and not row["ok"] for row in info.value.table)
    assert list(tmp_path.iterdir()) == []


def test_every_graph_parses_and_builds_with_tensorrt(bundle):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX (pip install 'vtprune[trt]') is not installed")
    from vtprune.backends.trt.build import build_engine
    from vtprune.backends.trt.profiles import ProfileLimits, profiles_from_onnx

    limits = ProfileLimits(batch=(1, 1, 2), sequence=(1, 32, 128), past=(0, 32, 128))
    for graph in ("vision", "embed", "decoder"):
        path = bundle / f"{graph}.onnx"
        result = build_engine(path, profiles=profiles_from_onnx(path, limits))
        assert result.engine_size > 0, graph


def test_seeded_sampling_matches_between_runtimes(bundles, tiny_dirs):
    from vtprune.backends.ort import OrtVlm
    from vtprune.config import SamplingConfig
    from vtprune.models import load_vlm

    sampling = SamplingConfig(temperature=1.0, top_p=0.95, seed=5)
    vlm = OrtVlm(bundles["tiny-llava"], sampling=sampling)
    cfg = PruneConfig.from_dict(read_manifest(bundles["tiny-llava"])["prune"])
    ref = PrunedVlm(load_vlm(tiny_dirs["tiny-llava"]), cfg, sampling).generate(_image(), PROMPT, max_new_tokens=16)
    assert vlm.generate(_image(), PROMPT, max_new_tokens=16).token_ids == ref.token_ids


def test_check_command_reports_parity_metrics(bundles, cache_dir, capsys):
    from vtprune.cli import main

    args = ["check", str(bundles["tiny-llava-next"]), "--cache-dir", str(cache_dir), "--json", "--steps", "8"]
    assert main(args) == 0
    rows = {r["check"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["kept visual indices"]["iou"] == 1.0
    assert rows["prefill logits"]["cosine"] > 0.999999 and rows["greedy tokens (8 steps)"]["agreement"] == 1.0


def test_iou_and_cosine():
    from vtprune.check.validate import cosine, iou

    assert iou(np.array([1, 2, 3]), np.array([2, 3, 4])) == 0.5 and iou(np.array([]), np.array([])) == 1.0
    assert cosine(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == 0.0
    assert cosine(np.array([1.0, 2.0]), np.array([2.0, 4.0])) == pytest.approx(1.0)


def test_lm_graphs_reused_from_a_bundle_of_the_same_model(bundles, tmp_path, cache_dir):
    donor = bundles["tiny-llava"]
    out = tmp_path / "none"
    m = export_bundle("tiny-llava", PruneConfig(), ExportConfig(reuse_lm_from=str(donor)), out, cache_dir)
    assert m["graphs"]["decoder"]["reused_from"] == str(donor)
    assert (out / "decoder.onnx").read_bytes() == (donor / "decoder.onnx").read_bytes()
    assert all(r["ok"] for r in m["validation"]["checks"])
    with pytest.raises(BundleError, match="was exported from tiny-llava"):
        export_bundle("tiny-llava-next", CFG, ExportConfig(reuse_lm_from=str(donor)), tmp_path / "x", cache_dir)


def test_sessions_spin_only_while_a_run_is_in_flight(bundles):
    """Three sessions share the cores: each pool spins during its own run (13% faster vision graph than
    no spinning) and stops when the run returns (idle spinning pools slowed generation 2.7-3.3x)."""
    from vtprune.backends.ort import make_session

    opts = make_session(bundles["tiny-llava"] / "embed.onnx").get_session_options()
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
