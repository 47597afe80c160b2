"""`vtprune build`: engines for a bundle's graphs with TensorRT for RTX (CPU-only builds), metadata,
manifest update, refusal rules and compatibility checks."""

from __future__ import annotations

import json
import shutil

import pytest

from vtprune.backends.trt.engines import BuildConfig, build_bundle, check_engine_compat
from vtprune.errors import BundleError, ConfigError
from vtprune.manifest import read_manifest


def _meta(**kw):
    return {"flavour": "tensorrt-rtx", "trt_version": "1.7.1.116", "target": "sm89"} | kw


def test_compatible_engine_passes_and_mismatches_name_both_sides():
    check_engine_compat(_meta(), "tensorrt-rtx", "1.7.1.116", "sm89")
    with pytest.raises(BundleError, match="tensorrt-rtx 1.7.1.116 cannot load in tensorrt 10.3.0"):
        check_engine_compat(_meta(), "tensorrt", "10.3.0", "sm87")
    with pytest.raises(BundleError, match="built for sm89 cannot run on this sm86 GPU"):
        check_engine_compat(_meta(), "tensorrt-rtx", "1.7.1.116", "sm86")
    check_engine_compat(_meta(target=None), "tensorrt-rtx", "1.7.1.116", "sm86")  # portable engine


@pytest.mark.parametrize(("kw", "match"), [({"max_batch": 0}, "max-batch"), ({"max_seq": 1}, "max-seq"),
                                           ({"graphs": ("vision", "lm")}, "graphs")])  # fmt: skip
def test_build_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        BuildConfig(**kw)


def test_graphs_a_bundle_lacks_are_refused_before_building(bundles):
    with pytest.raises(ConfigError, match="has only vision, embed, decoder"):
        build_bundle(bundles["tiny-llava"], BuildConfig(graphs=("prefill",)))


def test_build_engines_into_a_bundle(bundles, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX (pip install 'vtprune[trt]') is not installed")
    from vtprune.cli import main

    copy = tmp_path / "b"
    shutil.copytree(bundles["tiny-llava-next"], copy)
    engines = build_bundle(copy, BuildConfig(target="sm89", max_seq=256))
    assert set(engines) == {"vision", "embed", "decoder"}
    manifest = read_manifest(copy)  # sha256 of the engines verified too
    assert {"vision.engine", "decoder.engine.json"} <= set(manifest["files"])
    meta = json.loads((copy / "decoder.engine.json").read_text())
    assert meta["target"] == "sm89" and meta["onnx_sha256"] == manifest["files"]["decoder.onnx"]
    assert meta["build"]["max_seq"] == 256
    assert main(["build", str(copy)]) == 2 and "--force" in capsys.readouterr().err
    assert main(["build", str(copy), "--graphs", "embed", "--force"]) == 0
    assert not list(copy.glob(".engines-*"))
