"""Exports sized to the machine (``export.memory``): the plan chosen from a checkpoint's parameter count
and the memory available, refusals that name the need before anything loads, and a lean fp16 export
(the fp16 model as the reference) validated as a slice, run on a tiny model with the limits scaled down."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import BUNDLE_CFG
from vtprune.errors import ConfigError
from vtprune.export import memory
from vtprune.export.bundle import ExportConfig

GB = 1e9


@pytest.fixture
def seven_b(monkeypatch):  # LLaVA-1.5-7B's parts, as read from the headers of make-checkpoint's output
    parts = memory.Parts(7_063_427_072, 324_487_168, 131_334_144, 131_334_144, 32, 202_383_360)
    monkeypatch.setattr(memory, "checkpoint_parts", lambda path: parts)


@pytest.mark.parametrize(
    ("dtype", "available", "lean", "sliced"),
    [("fp16", 80 * GB, False, False), ("fp16", 50 * GB, False, True), ("fp16", 23 * GB, True, True),
     ("fp32", 90 * GB, False, False)],
)  # fmt: skip
def test_the_plan_follows_the_memory_available(seven_b, dtype, available, lean, sliced):
    plan = memory.plan_export(Path("ckpt"), dtype, True, int(available))
    assert (plan.lean, plan.slice_validation) == (lean, sliced)
    assert plan.need <= available
    assert not memory.plan_export(Path("ckpt"), dtype, False, int(available)).slice_validation


def test_what_does_not_fit_is_refused_with_the_need(seven_b):
    with pytest.raises(ConfigError, match=r"needs about 22 GB of memory and 15 GB is available; free memory"):
        memory.plan_export(Path("ckpt"), "fp16", True, int(15 * GB))
    with pytest.raises(ConfigError, match=r"needs about 22 GB of memory and 20 GB .* --no-validate needs about 18 GB"):
        memory.plan_export(Path("ckpt"), "fp16", True, int(20 * GB))
    assert memory.plan_export(Path("ckpt"), "fp16", False, int(20 * GB)).lean
    with pytest.raises(ConfigError, match=r"in fp32 needs about 32 GB .* export --dtype fp16, which needs about 22 GB"):
        memory.plan_export(Path("ckpt"), "fp32", True, int(22 * GB))


def test_w8a8_smoothing_counts_its_fp32_copy(seven_b):
    plain = memory.plan_export(Path("ckpt"), "fp32", False, int(90 * GB))
    smoothed = memory.plan_export(Path("ckpt"), "fp32", False, int(90 * GB), smoothing=True)
    assert smoothed.need - plain.need == pytest.approx(7_063_427_072 * 4, rel=0.01)
    with pytest.raises(ConfigError, match=r"--weights w8a8 quantizes fp32 graphs"):
        memory.plan_export(Path("ckpt"), "fp32", False, int(40 * GB), smoothing=True)


def test_small_models_keep_the_default_plan(tiny_dirs):
    plan = memory.plan_export(tiny_dirs["tiny-llava"], "fp16", True, 1)
    assert not plan.lean and not plan.slice_validation


def test_parameters_are_read_from_the_safetensors_headers(tiny_adapter):
    expected = sum(t.numel() for t in tiny_adapter.model.state_dict().values())
    parts = memory.checkpoint_parts(tiny_adapter.path)
    assert parts.total == memory.checkpoint_parameters(tiny_adapter.path) == expected
    assert parts.layers == tiny_adapter.text_dims().layers and parts.vision > 0 and parts.embed > 0
    assert parts.embed == tiny_adapter.model.get_input_embeddings().weight.numel()


def test_lean_export_is_validated_as_a_slice(tiny_dirs, tmp_path, monkeypatch, scene):
    from vtprune.api import export_bundle, open_runner
    from vtprune.check import validate
    from vtprune.manifest import read_manifest
    from vtprune.runtime.generate import generate

    params = memory.checkpoint_parameters(tiny_dirs["tiny-llava"])
    monkeypatch.setattr(memory, "SMALL", 0)
    monkeypatch.setattr(memory, "HEADROOM", 0)
    monkeypatch.setattr(memory, "ORT_FP16_BYTES", 1)  # a tiny model is nearly all vision and slice
    monkeypatch.setattr(memory, "VISION_EXPORT_COPIES", 1)
    monkeypatch.setattr(memory, "available_memory", lambda: params * 6)  # fp16 fits; fp32 + fp16 does not
    monkeypatch.setattr(validate, "SLICE_LAYERS", 1)
    out = tmp_path / "b"
    export_bundle(str(tiny_dirs["tiny-llava"]), BUNDLE_CFG, ExportConfig(dtype="fp16"), out)
    manifest = read_manifest(out)
    assert manifest["export_memory"]["reference"] == "export dtype (lean)"
    result = manifest["validation"]
    assert result["scope"].startswith("slice:") and "first 1 of 2 layers" in result["scope"]
    assert result["reference"] == "float16" and all(c["ok"] for c in result["checks"])
    assert manifest["graphs"]["decoder"]["num_layers"] == 2  # the bundle ships the whole decoder
    assert not list(tmp_path.glob(".b.slice-*"))
    with open_runner(out) as runner:
        assert len(generate(runner, scene, "what color is the shape ?", max_new_tokens=3).token_ids) >= 1
