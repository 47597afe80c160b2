"""The pocket VLM (real weights) exported as a bundle: validated parity, ONNX Runtime run, TensorRT build."""

from __future__ import annotations

import pytest

from vtprune.manifest import read_manifest


def test_pocket_bundle_matches_pytorch(pocket_bundle):
    checks = {r["check"]: r for r in read_manifest(pocket_bundle)["validation"]["checks"]}
    assert all(r["ok"] for r in checks.values())
    assert checks["prefill logits"]["max_abs_diff"] <= 1e-3 and checks["greedy tokens (32 steps)"]["ok"]
    graphs = read_manifest(pocket_bundle)["graphs"]
    assert graphs["vision"]["outputs"][0]["shape"][1:] == [64, 576]  # 64 kept tokens in SmolLM2's width


def test_pocket_vision_engine_builds_with_tensorrt(pocket_bundle):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX (pip install 'vtprune[trt]') is not installed")
    from vtprune.backends.trt.build import build_engine
    from vtprune.backends.trt.profiles import ProfileLimits, profiles_from_onnx

    path = pocket_bundle / "vision.onnx"
    result = build_engine(path, profiles_from_onnx(path, ProfileLimits(batch=(1, 1, 2))), target="sm89")
    assert result.engine_size > 10_000_000  # the 22M-parameter DINOv2 tower and projector are inside
