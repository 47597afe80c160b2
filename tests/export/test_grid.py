"""Weights already on a GGUF-style grid (``export.grid``) are written on it exactly, in ONNX Runtime's
MatMulNBits / GatherBlockQuantized; weights that are not stay for the usual quantizer."""

from __future__ import annotations

import numpy as np

from vtprune.export.grid import BLOCK, grid_of, quantize_on_grid


def _q4_1(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """A (K, N) weight as llama.cpp's Q4_1 dequantizes it: per block of 32 along K, ``m + d * q``, q in 0..15."""
    q = rng.integers(0, 16, (n, k // BLOCK, BLOCK)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15  # every block spans its whole range (Q4_1 blocks do: min and max are codes)
    d = rng.uniform(0.001, 0.02, (n, k // BLOCK, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.15, 0.0, (n, k // BLOCK, 1)).astype(np.float16).astype(np.float32)
    return (m + d * q).reshape(n, k).T.copy()


def _q8_0(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    q = rng.integers(-127, 128, (rows, cols // BLOCK, BLOCK)).astype(np.float32)
    q[..., 0] = 127
    d = rng.uniform(0.001, 0.01, (rows, cols // BLOCK, 1)).astype(np.float16).astype(np.float32)
    return (d * q).reshape(rows, cols)


def test_grid_of_finds_q4_1_and_q8_0_and_nothing_in_plain_floats():
    rng = np.random.default_rng(0)
    w = _q4_1(64, 24, rng)
    grid = grid_of(w.T)
    assert grid is not None and grid.bits == 4 and np.abs(grid.dequantized() - w.T).max() < 1e-6
    table = _q8_0(200, 64, rng)  # 2 of 400 blocks off the grid below: within ON_GRID
    table[-1] = rng.standard_normal(64)  # one row off the grid (a token added to a GGUF vocabulary)
    grid = grid_of(table)
    assert grid is not None and grid.bits == 8 and np.abs(grid.dequantized()[:-1] - table[:-1]).max() < 1e-6
    assert grid_of(rng.standard_normal((24, 64)).astype(np.float32)) is None
    assert grid_of(w[:40].T.copy()) is None  # 40 is not a whole number of blocks


def test_matmuls_and_gathers_on_a_grid_run_exactly_in_onnx_runtime():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    k, n, vocab = 64, 48, 30
    w1, w2, plain = _q4_1(k, n, rng), _q4_1(k, n, rng), rng.standard_normal((k, n)).astype(np.float32)
    table = _q8_0(vocab, k, rng)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "w1"], ["y1"], name="a"),
             helper.make_node("MatMul", ["x", "w2"], ["y2"], name="b"),  # the same input: block sums shared
             helper.make_node("MatMul", ["x", "plain"], ["y3"], name="c")]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "S"])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("y1", "y2", "y3")],
                              [numpy_helper.from_array(a, name) for a, name in
                               ((w1, "w1"), (w2, "w2"), (plain, "plain"), (table, "table"))])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    model, record = quantize_on_grid(model, accuracy_level=0)
    assert record["int4_affine"] == 2 and record["int8"] == 1 and len(record["fp32_matmuls"]) == 3
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulNBits") == 2 and "GatherBlockQuantized" in ops
    assert ops.count("MatMul") == 4  # the plain weight (left for the usual quantizer), one block sum, two offsets
    session = ort.InferenceSession(model.SerializeToString())
    ids = np.array([[3, 7, 7, 29]], np.int64)
    y1, y2, y3 = session.run(None, {"ids": ids})
    x = table[ids]
    for got, want in ((y1, x @ w1), (y2, x @ w2), (y3, x @ plain)):
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_qdq_form_is_exact_too():
    """The Q/DQ form TensorRT reads (blocked int4 DequantizeLinear + MatMul + block offsets), in ONNX Runtime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    w = _q4_1(64, 40, rng)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="a")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    model, record = quantize_on_grid(model, None, form="qdq")
    assert record["int4_affine"] == 1 and model.opset_import[0].version == 21
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert next(i for i in model.graph.initializer if i.name == dq.input[0]).data_type == TensorProto.INT4
    x = rng.standard_normal((1, 5, 64)).astype(np.float32)
    opts = ort.SessionOptions()  # without ONNX Runtime's Q/DQ -> MatMulNBits fusion (int8 activations: ~0.3%)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    y = ort.InferenceSession(model.SerializeToString(), opts).run(None, {"x": x})[0]
    assert np.abs(y - x @ w).max() <= 1e-4 * np.abs(x @ w).max()
