"""The ONNX function bodies of vtprune::GraphPropagate and vtprune::TopKRoute in ONNX Runtime, against
the PyTorch reference ops, with the cosine Gram as one MatMul and by symmetric row blocks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as oh

import vtprune.export.ops as ops
from vtprune.export.ops import onnx_defs

THETA, TAU, ITERS, K = 0.5, 0.03, 5, 24


def _model(n: int | str, d: int) -> onnx.ModelProto:
    nodes = [
        oh.make_node("GraphPropagate", ["x", "valid"], ["scores"], domain="vtprune", theta=THETA, tau=TAU, iters=ITERS),
        oh.make_node("TopKRoute", ["x", "scores"], ["tokens", "indices"], domain="vtprune", k=K),
    ]
    inputs = [oh.make_tensor_value_info("x", TP.FLOAT, ["batch", n, d]),
              oh.make_tensor_value_info("valid", TP.BOOL, ["batch", n])]  # fmt: skip
    outputs = [oh.make_tensor_value_info("scores", TP.FLOAT, ["batch", n]),
               oh.make_tensor_value_info("tokens", TP.FLOAT, ["batch", K, d]),
               oh.make_tensor_value_info("indices", TP.INT64, ["batch", K])]  # fmt: skip
    graph = oh.make_graph(nodes, "ops", inputs, outputs)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid("vtprune", 1)], ir_version=10)


def _run(model: onnx.ModelProto, x: np.ndarray, valid: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "valid": valid})


def _features(b: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered tokens (so the graph has real edges above theta), one batch row with padding."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(b, 6, d, generator=g)
    assign = torch.randint(0, 6, (b, n), generator=g)
    x = centres.gather(1, assign[..., None].expand(b, n, d)) + 0.6 * torch.randn(b, n, d, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, n - 9 :] = False
    return x.numpy(), valid.numpy()


@pytest.mark.parametrize("blocks", [1, 2, 3, 5])
def test_bodies_match_the_pytorch_ops(blocks: int):
    x, valid = _features(2, 61, 48)  # 61 rows: Split's last block is shorter
    model = onnx_defs.attach_functions(_model(61, 48), blocks=blocks)
    onnx.checker.check_model(model, full_check=True)
    scores, tokens, indices = _run(model, x, valid)
    ref_scores = ops.graph_propagate(torch.from_numpy(x), torch.from_numpy(valid), THETA, TAU, ITERS)
    ref_tokens, ref_idx = ops.topk_route(torch.from_numpy(x), ref_scores, K)
    assert np.isneginf(scores[~valid]).all()
    np.testing.assert_allclose(scores[valid], ref_scores.numpy()[valid], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(indices, ref_idx.numpy())
    np.testing.assert_array_equal(tokens, ref_tokens.numpy())
    assert (np.diff(indices, axis=-1) > 0).all()


def test_blocked_gram_gives_the_single_matmul_scores():
    x, valid = _features(2, 61, 48)
    one = _run(onnx_defs.attach_functions(_model(61, 48), blocks=1), x, valid)
    for blocks in (2, 4):
        out = _run(onnx_defs.attach_functions(_model(61, 48), blocks=blocks), x, valid)
        np.testing.assert_allclose(out[0], one[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(out[2], one[2])


@pytest.mark.parametrize(("n", "opset", "blocks"), [
    (None, 18, 1), (256, 18, 1), (511, 18, 1), (576, 18, 3), (576, 17, 1), (1152, 18, 6), (2304, 18, 8), (2880, 18, 8),
])  # fmt: skip
def test_block_count_follows_the_token_count(n, opset, blocks):
    assert onnx_defs.similarity_blocks(n, opset) == blocks


@pytest.mark.parametrize(("n", "blocks"), [(600, 4), ("tokens", 1), (100, 1)])
def test_attach_reads_the_static_token_count(n, blocks):
    model = onnx_defs.attach_functions(_model(n, 8))
    body = next(f for f in model.functions if f.name == "GraphPropagate")
    splits = [nd for nd in body.node if nd.op_type == "Split"]
    assert len(splits) == (blocks > 1)
    assert sum(nd.op_type == "MatMul" and nd.input[0].startswith("u") for nd in body.node) == blocks * (blocks + 1) // 2
    assert f"gram_blocks={blocks}" in body.doc_string
