"""Weight-only int8 / int4 bundles: ONNX Runtime's MatMulNBits in the language-model graphs, fp32 islands
where tokens are chosen, validated against the fp32 reference with the precision's thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vtprune.api import export_bundle
from vtprune.config import PruneConfig
from vtprune.export.bundle import ExportConfig
from vtprune.manifest import read_manifest

PROMPT = "what is in the image ?"


@pytest.fixture(scope="session")
def quantized(tmp_path_factory, cache_dir):
    """Export once per session: (family, method, weights) -> bundle."""
    root, made = tmp_path_factory.mktemp("quantized"), {}

    def get(name: str, cfg: PruneConfig, weights: str) -> Path:
        key = (name, cfg, weights)
        if key not in made:
            out = root / f"{name}-{cfg.method}-{weights}"
            export_bundle(name, cfg, ExportConfig(weights=weights), out, cache_dir)
            made[key] = out
        return made[key]

    return get


def _ops(path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _weight_matmuls(path: Path) -> list[str]:
    """MatMuls of ``path`` whose second input is a constant weight (attention's MatMuls multiply activations)."""
    import onnx

    graph = onnx.load(str(path)).graph
    consts = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in consts]


@pytest.mark.parametrize("weights", ["int8", "int4", "w8a8"])
def test_quantized_bundle_validates_and_records_what_it_holds(quantized, weights):
    bundle = quantized("tiny-llava", PruneConfig(method="gprune", keep=16), weights)
    m = read_manifest(bundle)
    assert m["export"]["weights"] == weights and m["validation"]["precision"] == weights
    assert all(r["ok"] for r in m["validation"]["checks"])
    q = m["graphs"]["decoder"]["quantization"]
    assert q["weights"] == weights and q["block_size"] == {"int8": 128, "int4": 32, "w8a8": 128}[weights]
    assert q["quantized_nodes"] > 0 and q["fp32_matmuls"] == []
    assert "quantization" not in m["graphs"]["vision"]  # the vision graph and its pruning stage stay fp32
    quantized_op = "MatMulInteger" if weights == "w8a8" else "MatMulNBits"  # w8a8: smoothed, see below
    assert quantized_op in _ops(bundle / "decoder.onnx") and _weight_matmuls(bundle / "decoder.onnx") == []
    assert "MatMulNBits" not in _ops(bundle / "vision.onnx")
    assert m["graphs"]["decoder"]["exporter"] == "fused" and "GroupQueryAttention" in _ops(bundle / "decoder.onnx")
    kept = next(r for r in m["validation"]["checks"] if r["check"] == "kept visual indices")
    assert kept["margin_limit"] == 1e-4  # judged as an fp32 graph


def test_w8a8_is_smoothed_and_quantizes_activations(quantized):
    bundle = quantized("tiny-llava", PruneConfig(method="gprune", keep=16), "w8a8")
    ops = _ops(bundle / "decoder.onnx")
    m = read_manifest(bundle)
    q, smoothing = m["graphs"]["decoder"]["quantization"], m["smoothing"]
    assert smoothing["method"] == "smoothquant" and smoothing["calibration"]["source"] == "easy-vqa"
    assert q["smoothquant"] and ops.count("MatMulNBits") == q["blockwise_matmuls"] == len(smoothing["blockwise"])
    assert ops.count("MatMulInteger") == q["dynamic_matmuls"] > 0 and "DynamicQuantizeLinear" in ops
    from vtprune.bench.targets import OrtTarget

    assert OrtTarget(bundle).subject()["precision"] == "w8a8"  # reports name the format, not the fp32 dtype


def test_int4_shrinks_the_language_model(quantized, bundles):
    from tests.conftest import BUNDLE_CFG  # noqa: F401  (the fp32 bundles are exported with keep 0.25)

    int4 = quantized("tiny-llava", PruneConfig(method="gprune", keep=16), "int4")
    fp32 = bundles["tiny-llava"]
    for graph in ("decoder", "embed"):
        assert (int4 / f"{graph}.onnx").stat().st_size < 0.6 * (fp32 / f"{graph}.onnx").stat().st_size
    assert "GatherBlockQuantized" in _ops(int4 / "embed.onnx")


def test_routed_bundle_keeps_its_selectors_fp32(quantized):
    import onnx

    bundle = quantized("tiny-llava", PruneConfig(method="alvts", keep=16, layer=0), "int4")
    m = read_manifest(bundle)
    q = m["graphs"]["prefill"]["quantization"]
    assert q["quantized_nodes"] > 0 and len(q["fp32_matmuls"]) >= 2  # each routed layer's factors
    graph = onnx.load(str(bundle / "prefill.onnx")).graph
    factors = [i for i in graph.initializer if i.name.startswith("alvts_")]
    assert factors and all(i.data_type == onnx.TensorProto.FLOAT for i in factors)
    layers = next(r for r in m["validation"]["checks"] if r["check"] == "kept visual tokens per routed layer")
    assert layers["ok"] and layers["margin_limit"] is None and layers["max_margin"] >= 0.0  # reported


def test_quantized_bundle_answers_like_the_fp32_reference_starts(quantized, tiny_dirs, scene):
    from vtprune.backends.ort import OrtVlm
    from vtprune.models import load_vlm
    from vtprune.runtime.pipeline import PrunedVlm

    cfg = PruneConfig(method="gprune", keep=16)
    bundle = quantized("tiny-llava", cfg, "int8")
    got = OrtVlm(bundle).generate(scene, PROMPT, max_new_tokens=4)
    ref = PrunedVlm(load_vlm(str(tiny_dirs["tiny-llava"])), cfg).generate(scene, PROMPT, max_new_tokens=4)
    assert got.visual_tokens_kept == ref.visual_tokens_kept == 16
    assert got.token_ids[0] == ref.token_ids[0]  # int8's first token is the reference's (recorded gate)


def test_weights_need_fp32_graphs_and_a_known_format(tmp_path, capsys):
    from vtprune.cli import main

    for flags, msg in ((["--weights", "int4", "--dtype", "fp16"], "drop --dtype fp16"),):
        code = main(["export", "--model", "tiny-llava", "--out", str(tmp_path / "b"), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and msg in err[0]
    with pytest.raises(SystemExit):
        main(["export", "--model", "tiny-llava", "--out", str(tmp_path / "b"), "--weights", "int3"])
    assert not (tmp_path / "b").exists()


def test_build_refuses_quantized_graphs_in_one_line(quantized, capsys, tmp_path):
    import shutil

    from vtprune.cli import main

    bundle = tmp_path / "q"
    shutil.copytree(quantized("tiny-llava", PruneConfig(method="gprune", keep=16), "int4"), bundle)
    capsys.readouterr()  # the export's own progress, when this test makes the bundle
    code = main(["build", str(bundle)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "MatMulNBits" in err[0] and "--graphs vision" in err[0]
    assert not list(bundle.glob("*.engine"))


def test_reuse_lm_from_needs_the_same_weights(quantized, cache_dir, tmp_path):
    from vtprune.errors import BundleError

    donor = quantized("tiny-llava", PruneConfig(method="gprune", keep=16), "int4")
    with pytest.raises(BundleError, match="in int4, not tiny-llava at opset 18 in fp32"):
        export_bundle("tiny-llava", PruneConfig(method="uniform", keep=16), ExportConfig(reuse_lm_from=str(donor)),
                      tmp_path / "o", cache_dir)  # fmt: skip
    reused = tmp_path / "r"
    export_bundle("tiny-llava", PruneConfig(method="uniform", keep=16),
                  ExportConfig(reuse_lm_from=str(donor), weights="int4"), reused, cache_dir)  # fmt: skip
    assert (reused / "decoder.onnx").read_bytes() == (donor / "decoder.onnx").read_bytes()
    assert np.isfinite(read_manifest(reused)["validation"]["checks"][-2]["cosine"])


def test_int4_trt_is_blocked_qdq_that_tensorrt_builds(cache_dir, tmp_path):
    """--weights int4-trt: the traced decoder with int4 weights as blocked DequantizeLinear (TensorRT's
    weight-only form), validated in ONNX Runtime, and built by TensorRT-RTX where it is installed."""
    import onnx

    from tests.runtime.test_trt_build import NO_TRT, TARGET
    from vtprune.backends.trt.engines import BuildConfig, build_bundle

    out = tmp_path / "b"
    export_bundle("tiny-llava", PruneConfig(method="gprune", keep=16), ExportConfig(weights="int4-trt"), out, cache_dir)
    m = read_manifest(out)
    q = m["graphs"]["decoder"]["quantization"]
    assert q["form"] == "qdq" and q["quantized_nodes"] > 0 and m["validation"]["precision"] == "int4"
    assert all(r["ok"] for r in m["validation"]["checks"])
    assert m["graphs"]["decoder"]["exporter"] != "fused"  # TensorRT builds the traced decoder
    graph = onnx.load(str(out / "decoder.onnx")).graph
    inits = {i.name: i for i in graph.initializer}
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and all(inits[n.input[0]].data_type == onnx.TensorProto.INT4 for n in dqs)
    assert all(next(a.i for a in n.attribute if a.name == "block_size") == 32 for n in dqs)
    assert "MatMulNBits" not in _ops(out / "decoder.onnx") and _weight_matmuls(out / "decoder.onnx") == []
    _engine_judged_as_int4(out, cache_dir)
    if NO_TRT:
        pytest.skip(NO_TRT)  # what TensorRT needs is checked above; the build needs a builder
    engines = build_bundle(out, BuildConfig(graphs=("decoder",), target=TARGET))
    assert engines["decoder"]["engine_size"] > 0 and (out / "decoder.engine").is_file()


def _engine_judged_as_int4(bundle: Path, cache_dir: Path) -> None:
    """``vtprune check --backend trt`` judges an int4-trt bundle's engines as int4 (next-token KL), not by the
    fp16 cosines a 4-bit model cannot meet (the engines here: ONNX Runtime stand-ins)."""
    from tests.runtime.test_trt_runner import fake_runner
    from vtprune.check.validate import MAX_KL, compare_backends
    from vtprune.images import scene_image
    from vtprune.models import load_vlm

    adapter = load_vlm("tiny-llava", cache_dir=cache_dir)
    cfg = PruneConfig.from_dict(read_manifest(bundle)["prune"])
    rows = {r["check"]: r for r in compare_backends(adapter, cfg, bundle, scene_image(), PROMPT, 8,
                                                    fake_runner(bundle))}  # fmt: skip
    assert all(r["ok"] for r in rows.values()), rows
    assert rows["prefill logits"]["max_kl"] == MAX_KL["int4"]


def test_int8_trt_is_static_qdq_that_tensorrt_builds(cache_dir, tmp_path):
    """--weights int8-trt: SmoothQuant, then the traced decoder's weight MatMuls but the down projections as
    Q/DQ with static int8 activation scales (one per tensor) calibrated on images, validated in ONNX Runtime,
    and built by TensorRT-RTX where it is installed."""
    import onnx
    from onnx import TensorProto

    from tests.runtime.test_trt_build import NO_TRT, TARGET
    from vtprune.backends.trt.engines import BuildConfig, build_bundle

    out = tmp_path / "b"
    export_bundle("tiny-llava", PruneConfig(method="gprune", keep=16), ExportConfig(weights="int8-trt", calib_n=4),
                  out, cache_dir)  # fmt: skip
    m = read_manifest(out)
    q = m["graphs"]["decoder"]["quantization"]
    assert q["form"] == "qdq" and q["quantized_nodes"] > 0 and q["calibration"]["prompts"] == 4
    assert m["validation"]["precision"] == "w8a8" and all(r["ok"] for r in m["validation"]["checks"])
    assert "smoothing" in m and "quantization" not in m["graphs"]["embed"]
    assert m["graphs"]["decoder"]["exporter"] != "fused"
    assert sorted(_weight_matmuls(out / "decoder.onnx")) == q["fp32_matmuls"]  # the others read Q/DQ weights
    graph = onnx.load(str(out / "decoder.onnx")).graph
    layers = sum(i.name.endswith(".key") for i in graph.input)
    assert len(q["fp32_matmuls"]) == layers  # one down projection per layer
    inits = {i.name: i for i in graph.initializer}
    quants = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quants) == q["qdq_pairs"] >= q["quantized_nodes"]  # each MatMul's activation input
    for n in quants:  # static, one scale per tensor, symmetric
        scale, zero = inits[n.input[1]], inits[n.input[2]]
        assert not scale.dims and zero.data_type == TensorProto.INT8 and not onnx.numpy_helper.to_array(zero).any()
    if NO_TRT:
        pytest.skip(NO_TRT)  # what TensorRT needs is checked above; the build needs a builder
    engines = build_bundle(out, BuildConfig(graphs=("decoder",), target=TARGET))
    assert engines["decoder"]["engine_size"] > 0 and (out / "decoder.engine").is_file()


def test_int8_trt_refuses_what_it_cannot_write(tmp_path, capsys):
    from vtprune.cli import main

    for flags, msg in ((["--weights", "int8-trt", "--method", "alvts", "--keep", "4", "--layer", "1"],
                        "pre-LLM methods only"),
                       (["--weights", "int8-trt", "--decoder", "fused"], "--decoder fused with --weights int8-trt")):
        code = main(["export", "--model", "tiny-llava", "--out", str(tmp_path / "b"), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "b").exists()
