"""fp16 bundles per tiny family: dtype-aware validation against the fp32 reference, graph IO dtypes in the
manifest and in the files, fp32 pruning stage and islands, ONNX Runtime runs through the CLI, refusals,
and a TensorRT-RTX build."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BUNDLE_CFG as CFG
from tests.conftest import FAMILIES
from vtprune.api import export_bundle
from vtprune.errors import AccuracyError, BundleError, ConfigError
from vtprune.export.bundle import ExportConfig
from vtprune.manifest import read_manifest

PROMPT = "what color is the shape ?"
_FP16: dict[str, Path] = {}


@pytest.fixture(scope="module")
def fp16_bundle_of(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    """``fp16_bundle_of(family)``: a validated fp16 bundle of that tiny family, exported once per module."""
    root = tmp_path_factory.mktemp("fp16")

    def get(name: str) -> Path:
        if name not in _FP16:
            export_bundle(name, CFG, ExportConfig(dtype="fp16"), root / name, cache_dir)
            _FP16[name] = root / name
        return _FP16[name]

    return get


@pytest.fixture(params=sorted(FAMILIES))
def fp16_bundle(request, fp16_bundle_of) -> Path:
    return fp16_bundle_of(request.param)


def _onnx_io(path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    values = [*model.graph.input, *model.graph.output]
    return {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name for v in values}


def test_validation_is_dtype_aware_and_recorded(fp16_bundle):
    from vtprune.check.validate import MIN_COSINE
    from vtprune.prune.ties import FP16_MARGIN

    validation = read_manifest(fp16_bundle)["validation"]
    rows = {r["check"]: r for r in validation["checks"]}
    assert validation["dtype"] == "fp16" == validation["precision"]
    assert validation["thresholds"]["logits_min_cosine"] == MIN_COSINE["fp16"]["logits"]
    assert all(r["ok"] for r in rows.values()) and len(rows) == 6
    assert rows["decoder input embeds"]["cosine"] >= MIN_COSINE["fp16"]["embeds"]
    assert rows["prefill logits"]["cosine"] >= MIN_COSINE["fp16"]["logits"]
    kept = rows["kept visual indices"]
    assert kept["iou"] >= 0.8  # measured: 1.0 (llava, llava-next), 15/17 (qwen2.5-vl: one swap inside an exact tie)
    assert kept["iou"] == 1.0 or kept["max_margin"] <= FP16_MARGIN == kept["margin_limit"]
    greedy = rows["greedy tokens (32 steps)"]
    assert greedy["agree_prefix"] >= 1 and 0.0 < greedy["agreement"] <= 1.0


def test_graph_dtypes_are_in_the_manifest_and_the_files(fp16_bundle):
    m = read_manifest(fp16_bundle)
    assert m["export"]["dtype"] == "fp16"
    for graph, spec in m["graphs"].items():
        declared = {e["name"]: e["dtype"] for e in spec["inputs"] + spec["outputs"]}
        assert declared == _onnx_io(fp16_bundle / f"{graph}.onnx"), graph
        assert spec["dtype"] == "fp16" and (spec["fp32_parts"] or graph == "embed")
    vision, embed, decoder = ({e["name"]: e["dtype"] for e in m["graphs"][g]["inputs"] + m["graphs"][g]["outputs"]}
                              for g in ("vision", "embed", "decoder"))  # fmt: skip
    assert vision["pixel_values"] == "float32" and vision["image_embeds"] == "float16"
    assert embed["inputs_embeds"] == "float16" and decoder["inputs_embeds"] == "float16"
    assert decoder["logits"] == "float32" and decoder["attention_mask"] == "int64"
    kv = [dtype for name, dtype in decoder.items() if name.startswith(("past_key_values.", "present."))]
    assert len(kv) == 4 * m["graphs"]["decoder"]["num_layers"] and set(kv) == {"float16"}


def test_weights_are_fp16(fp16_bundle):
    import onnx
    from onnx import numpy_helper

    for graph in ("vision", "embed", "decoder"):
        nbytes = {"FLOAT": 0, "FLOAT16": 0}
        for init in onnx.load(str(fp16_bundle / f"{graph}.onnx")).graph.initializer:
            kind = onnx.TensorProto.DataType.Name(init.data_type)
            nbytes[kind] = nbytes.get(kind, 0) + numpy_helper.to_array(init).nbytes
        share = nbytes["FLOAT16"] / (nbytes["FLOAT"] + nbytes["FLOAT16"])
        # qwen2.5-vl's vision graph keeps its last block and merger (of 2 blocks) in fp32
        assert share > (0.2 if (fp16_bundle.name, graph) == ("tiny-qwen2.5-vl", "vision") else 0.99), (graph, share)


def test_pruning_ops_see_fp32_inputs(fp16_bundle):
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp16_bundle / "vision.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    custom = [n for n in model.graph.node if n.domain == "vtprune"]
    assert {n.op_type for n in custom} == {"GraphPropagate", "TopKRoute"}
    for node in custom:
        floats = [types[i] for i in node.input if types[i] != onnx.TensorProto.BOOL]
        assert floats and set(floats) == {onnx.TensorProto.FLOAT}, node.op_type


def _weight_dtypes(path: Path) -> set[tuple[tuple[int, ...], str]]:
    import onnx

    model = onnx.load(str(path))
    return {(tuple(i.dims), onnx.TensorProto.DataType.Name(i.data_type)) for i in model.graph.initializer}


def test_qwen_vision_keeps_its_last_block_and_merger_in_fp32(fp16_bundle_of, tiny_dirs):
    from vtprune.models import load_vlm

    weights = _weight_dtypes(fp16_bundle_of("tiny-qwen2.5-vl") / "vision.onnx")
    adapter = load_vlm(tiny_dirs["tiny-qwen2.5-vl"])
    model = adapter.model
    islands = adapter.fp32_islands(model)
    assert set(islands) == {"vision last block", "vision patch merger"}
    for name, module in islands.items():
        assert all((tuple(p.shape), "FLOAT") in weights for p in module.parameters() if p.ndim == 2), name
    first = model.model.visual.blocks[0]
    assert all((tuple(p.shape), "FLOAT16") in weights for p in first.parameters() if p.ndim == 2)
    llava = _weight_dtypes(fp16_bundle_of("tiny-llava") / "vision.onnx")
    assert not any(dtype == "FLOAT" and len(dims) == 2 for dims, dtype in llava), "tiny-llava has no fp32 island"


def test_export_copy_leaves_the_reference_fp32(tiny_dirs):
    import torch

    from vtprune.export.precision import export_copy
    from vtprune.models import load_vlm

    adapter = load_vlm(tiny_dirs["tiny-qwen2.5-vl"])
    half = export_copy(adapter, "fp16")
    assert export_copy(adapter, "fp32") is adapter and half.model is not adapter.model
    assert {p.dtype for p in adapter.model.parameters()} == {torch.float32}
    assert half.model.model.visual.merger.ln_q.weight.dtype == torch.float32
    assert half.model.model.language_model.layers[0].mlp.down_proj.weight.dtype == torch.float16


def test_ort_runner_feeds_the_manifest_dtypes(fp16_bundle_of):
    from vtprune.backends.ort import OrtVlm

    vlm = OrtVlm(fp16_bundle_of("tiny-llava"))
    past = vlm._empty_past()
    assert vlm.dtype == "fp16" and {v.dtype for v in past.values()} == {np.dtype(np.float16)}
    d = vlm.decoder_io["hidden"]
    logits, present = vlm.decoder_step(np.ones((1, 2, d), np.float32), np.array([[0, 1]]), past)
    assert logits.dtype == np.float32 and {v.dtype for v in present.values()} == {np.dtype(np.float16)}


def test_cli_run_on_an_fp16_bundle(fp16_bundle_of, cache_dir, png, capsys):
    from vtprune.cli import main

    bundle = fp16_bundle_of("tiny-llava")
    keep = str(read_manifest(bundle)["prune"]["keep"])
    assert main(["run", str(bundle), "--image", str(png), "--prompt", PROMPT, "--json"]) == 0
    ort_out = json.loads(capsys.readouterr().out)
    args = ["run", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--keep", keep]
    assert main([*args, "--image", str(png), "--prompt", PROMPT, "--json"]) == 0
    torch_out = json.loads(capsys.readouterr().out)
    assert ort_out["token_ids"][0] == torch_out["token_ids"][0]
    assert ort_out["visual_tokens_kept"] == torch_out["visual_tokens_kept"]


def test_bf16_is_refused_in_one_line(tmp_path, cache_dir, capsys):
    from vtprune.cli import main

    with pytest.raises(ConfigError, match="--dtype bf16: bundles export fp32 or fp16"):
        ExportConfig(dtype="bf16")
    args = ["export", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--dtype", "bf16"]
    assert main([*args, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--dtype bf16" in err
    assert list(tmp_path.iterdir()) == []


def test_lm_graphs_are_reused_only_from_the_same_dtype(fp16_bundle_of, tmp_path, cache_dir):
    donor = fp16_bundle_of("tiny-llava")
    with pytest.raises(BundleError, match="in fp16, not tiny-llava at opset 18 in fp32"):
        export_bundle("tiny-llava", CFG, ExportConfig(reuse_lm_from=str(donor)), tmp_path / "x", cache_dir)
    m = export_bundle("tiny-llava", CFG, ExportConfig(dtype="fp16", reuse_lm_from=str(donor)), tmp_path / "y",
                      cache_dir)  # fmt: skip
    assert m["graphs"]["decoder"]["reused_from"] == str(donor) and m["graphs"]["decoder"]["dtype"] == "fp16"


def test_failed_fp16_validation_leaves_nothing_behind(fp16_bundle_of, tmp_path, cache_dir, monkeypatch):
    import vtprune.check.validate as validate

    monkeypatch.setitem(validate.MIN_COSINE, "fp16", {"embeds": 0.999, "logits": 1.1})  # no logits cosine passes
    export = ExportConfig(dtype="fp16", reuse_lm_from=str(fp16_bundle_of("tiny-llava")))
    with pytest.raises(AccuracyError, match="exported fp16 bundle disagrees with PyTorch on: prefill logits") as info:
        export_bundle("tiny-llava", CFG, export, tmp_path / "out", cache_dir)
    assert [r["check"] for r in info.value.table if not r["ok"]] == ["prefill logits"]
    assert list(tmp_path.iterdir()) == []


def test_kept_rows_pass_only_inside_the_margin():
    from vtprune.check.validate import kept_row

    own = np.array([0, 1])
    assert kept_row("k", own, own, [0.0], 1e-4)["ok"]
    tie = kept_row("k", own, np.array([0, 2]), [3e-7], 1e-4)
    assert tie == {"check": "k", "ok": True, "iou": 1 / 3, "swapped": 1, "max_margin": 3e-7, "margin_limit": 1e-4}
    assert not kept_row("k", own, np.array([0, 3]), [0.2, 0.0], 1e-4)["ok"]
    assert not kept_row("k", own, np.array([0, 3]), [float("inf")], 1e-2)["ok"]


def test_greedy_rows():
    from vtprune.check.validate import _greedy

    logits = np.array([-1.0, 0, 0, 0, 3, 9, 5, 0, 0, 1])  # the reference ranks 5, 6, 4, 9, ..., 0 last
    row = _greedy("g", np.array([5, 6, 7, 8]), np.array([5, 6, 9, 8]), "fp16", logits)
    assert row["ok"] and row["agree_prefix"] == 2 and row["agreement"] == 0.75 and row["first_token_rank"] == 0
    assert not _greedy("g", np.array([5, 6]), np.array([5, 7]), "fp32", logits)["ok"]
    assert not _greedy("g", np.array([5, 6]), np.array([4, 6]), "fp16", logits)["ok"]
    assert _greedy("g", np.array([5, 6]), np.array([4, 6]), "int4", logits)["first_token_rank"] == 2
    assert _greedy("g", np.array([5, 6]), np.array([4, 6]), "int4", logits)["ok"]  # within the top 5
    assert not _greedy("g", np.array([5, 6]), np.array([0, 6]), "int4", logits)["ok"]


@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_reference_following_its_own_kept_tokens_is_itself(tiny_adapter, scene, positions):
    """Given the reference's own choice, a reference that follows it rebuilds exactly its prefill (margin 0)."""
    from vtprune.runtime.pipeline import Follow, PrunedVlm

    cfg = dataclasses.replace(CFG, keep=8, positions=positions)
    pipe = PrunedVlm(tiny_adapter, cfg)
    inputs = pipe.inputs(scene, PROMPT)
    own = pipe.build_prefill(inputs)
    follower = PrunedVlm(tiny_adapter, cfg, follow=Follow(visual=own.visual_keep))
    rebuilt = follower.build_prefill(inputs)
    assert rebuilt.embeds.shape == own.embeds.shape and bool((rebuilt.embeds == own.embeds).all())
    assert rebuilt.position_ids.tolist() == own.position_ids.tolist()
    assert rebuilt.seq_keep.tolist() == own.seq_keep.tolist()
    assert follower.last_margins and max(follower.last_margins) == 0.0


def test_tensorrt_rtx_builds_an_fp16_bundle(fp16_bundle_of, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX (pip install 'vtprune[trt]') is not installed")
    from vtprune.backends.trt.engines import BuildConfig, build_bundle

    bundle = tmp_path / "b"
    shutil.copytree(fp16_bundle_of("tiny-qwen2.5-vl"), bundle)
    engines = build_bundle(bundle, BuildConfig(target="sm89", max_seq=128))
    assert set(engines) == {"vision", "embed", "decoder"}
    assert all(e["precision"] == "typed" and e["engine_size"] > 0 for e in engines.values())
    assert read_manifest(bundle)["engines"] == engines
