"""--vision int8: the vision encoder and projector as int8 QDQ with static scales calibrated on images; the
pruning stage stays fp32; validated against the fp32 reference; TensorRT builds refuse it."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtprune.api import export_bundle
from vtprune.config import PruneConfig
from vtprune.errors import ConfigError, InputError
from vtprune.export.bundle import ExportConfig
from vtprune.images import calibration_images
from vtprune.manifest import read_manifest


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory, scene):
    root = tmp_path_factory.mktemp("calib")
    for i, size in enumerate([(320, 240), (200, 300), (256, 256), (400, 180)]):
        scene.resize(size).rotate(30 * i).save(root / f"img{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def _onnx(path: Path):
    import onnx

    return onnx.load(str(path))


CASES = [("tiny-llava", "gprune"), ("tiny-llava", "pool"), ("tiny-qwen2.5-vl", "gprune"), ("tiny-llava-next", "gprune")]


@pytest.mark.parametrize(("name", "method"), CASES)
def test_int8_vision_bundle_validates_and_keeps_the_pruning_stage_fp32(name, method, calib_dir, cache_dir, tmp_path):
    out = tmp_path / "b"
    export = ExportConfig(vision="int8", calib_data=str(calib_dir), calib_n=3)
    export_bundle(name, PruneConfig(method=method, keep=4), export, out, cache_dir)
    m = read_manifest(out)
    q = m["graphs"]["vision"]["quantization"]
    assert q["vision"] == "int8" and q["calibration"] == {"source": str(calib_dir), "images": 3}
    assert q["quantized_nodes"] > 0 and q["qdq_pairs"] > 0
    assert m["validation"]["precision"] == "vision-int8" and all(r["ok"] for r in m["validation"]["checks"])
    assert "margins reported" in m["validation"]["thresholds"]["kept"]
    graph = _onnx(out / "vision.onnx").graph
    ops = [n.op_type for n in graph.node]
    assert "DequantizeLinear" in ops and "TopKRoute" in ops
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for node in graph.node:  # the pruning stage reads fp32 tensors only: no dequantized input
        if node.op_type in ("TopKRoute", "GraphPropagate"):
            assert not dequantized & set(node.input), node.op_type
    if method == "pool":  # its constant averaging MatMul is part of the stage: not quantized
        pool_mm = [n for n in graph.node if n.op_type == "MatMul" and "aten.matmul" in
                   next((p.value for p in n.metadata_props if p.key == "namespace"), "")]  # fmt: skip
        assert pool_mm and not any(dequantized & set(n.input) for n in pool_mm)


def test_int8_vision_with_w8a8_language_model(calib_dir, cache_dir, tmp_path):
    export_bundle("tiny-llava", PruneConfig(method="gprune", keep=4),
                  ExportConfig(weights="w8a8", vision="int8", calib_data=str(calib_dir), calib_n=2),
                  tmp_path / "b", cache_dir)  # fmt: skip
    m = read_manifest(tmp_path / "b")
    assert m["validation"]["precision"] == "w8a8" and "quantization" in m["graphs"]["vision"]
    assert m["validation"]["thresholds"]["embeds_min_cosine"] == 0.995
    assert m["validation"]["thresholds"]["greedy"] == "first token in the reference's top 2"  # two quantized stages
    assert m["smoothing"]["calibration"] == {"source": str(calib_dir), "images": 2}  # w8a8 calibrates on them too


def test_calibration_images(calib_dir):
    picked = calibration_images(str(calib_dir), 3, seed=1)
    assert len(picked) == 3 and picked == calibration_images(str(calib_dir), 3, seed=1)
    assert all(p.suffix == ".png" for p in picked)
    assert len(calibration_images(str(calib_dir), 100)) == 4
    with pytest.raises(InputError, match="not a directory"):
        calibration_images(str(calib_dir / "notes.txt"), 2)
    empty = calib_dir / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no .png"):
        calibration_images(str(empty), 2)


def test_int8_vision_refusals(calib_dir, cache_dir, tmp_path, capsys):
    from vtprune.cli import main

    with pytest.raises(ConfigError, match="drop --dtype fp16"):
        ExportConfig(vision="int8", dtype="fp16")
    with pytest.raises(ConfigError, match="reads the encoder's own layers"):
        export_bundle("tiny-llava", PruneConfig(method="visionzip", keep=4),
                      ExportConfig(vision="int8", calib_data=str(calib_dir)), tmp_path / "v", cache_dir)  # fmt: skip
    assert not (tmp_path / "v").exists()
    code = main(["export", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--out", str(tmp_path / "b"),
                 "--vision", "int8", "--calib-data", str(tmp_path / "nowhere")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--calib-data" in err[0] and not (tmp_path / "b").exists()


def test_build_refuses_an_int8_vision_graph(calib_dir, cache_dir, tmp_path, capsys):
    from vtprune.cli import main

    export = ExportConfig(vision="int8", calib_data=str(calib_dir), calib_n=2)
    export_bundle("tiny-llava", PruneConfig(method="gprune", keep=4), export, tmp_path / "b", cache_dir)
    capsys.readouterr()  # the export's own output (loading progress)
    code = main(["build", str(tmp_path / "b"), "--graphs", "vision"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "int8" in err[0] and not list((tmp_path / "b").glob("*.engine"))


def test_int8_trt_vision_is_symmetric_and_tensorrt_builds_it(calib_dir, cache_dir, tmp_path):
    import numpy as np
    from onnx import numpy_helper

    from tests.runtime.test_trt_build import NO_TRT, TARGET
    from vtprune.backends.trt.engines import BuildConfig, build_bundle

    out = tmp_path / "b"
    export = ExportConfig(vision="int8-trt", calib_data=str(calib_dir), calib_n=2)
    export_bundle("tiny-llava", PruneConfig(method="gprune", keep=4), export, out, cache_dir)
    m = read_manifest(out)
    q = m["graphs"]["vision"]["quantization"]
    assert q["vision"] == "int8-trt" and q["activations"].startswith("int8 per tensor")
    assert "symmetric" in q["activations"]
    assert m["validation"]["precision"] == "vision-int8" and all(r["ok"] for r in m["validation"]["checks"])
    graph = _onnx(out / "vision.onnx").graph
    inits = {i.name: i for i in graph.initializer}
    zero_points = [numpy_helper.to_array(inits[n.input[2]]) for n in graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]  # fmt: skip
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # TensorRT: zero points 0
    if NO_TRT:
        pytest.skip(NO_TRT)  # what TensorRT needs is checked above; the build needs a builder
    engines = build_bundle(out, BuildConfig(graphs=("vision",), target=TARGET))
    assert engines["vision"]["engine_size"] > 0 and (out / "vision.engine").is_file()


def test_int8_trt_keeps_biases_float(tmp_path):
    """TensorRT dequantizes int8 tensors only: ``int8-trt`` leaves a layer's bias fp32 (``int8`` quantizes it
    to int32, ONNX Runtime's form)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from vtprune.export.quantize import quantize_vision

    rng = np.random.default_rng(0)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="patch", kernel_shape=[2, 2], strides=[2, 2])
    conv.metadata_props.add(key="namespace", value="patch: aten.conv2d.default")
    graph = helper.make_graph(
        [conv], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 2, 2)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")])  # fmt: skip
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    for fmt, bias_type in (("int8-trt", None), ("int8", TensorProto.INT32)):
        path = tmp_path / f"{fmt}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
        quantize_vision(path, feeds, "test", fmt)
        model = onnx.load(str(path))
        types = {i.name: i.data_type for i in model.graph.initializer}
        dq_inputs = [types.get(n.input[0]) for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert (TensorProto.INT32 in dq_inputs) == (bias_type is not None), fmt
