"""The fused Triton kernels of the pruning ops against the PyTorch reference.

Without CUDA they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET before triton is
imported); on a GPU machine the same tests run the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton (pip install 'vtprune[gpu]') is not installed")

from vtprune.export.ops import kernels  # noqa: E402
from vtprune.export.ops.trt_plugins import launch_graph_propagate, launch_topk_route  # noqa: E402
from vtprune.prune import gprune  # noqa: E402
from vtprune.prune.select import gather_tokens, keep_topk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def clustered(b: int, n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Tokens in a few clusters, so the cosine graph has real edges at theta = 0.5."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 6, d, generator=g)
    x = centres[:, torch.randint(0, 6, (n,), generator=g)] + 0.7 * torch.randn(b, n, d, generator=g)
    return (x * torch.rand(b, n, 1, generator=g).add(0.5)).to(DEVICE, dtype)


def pads(b: int, n: int, last: int) -> torch.Tensor:
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[-1, n - last :] = False
    return valid.to(DEVICE)


@pytest.mark.parametrize("iters", [0, 1, 5])
@pytest.mark.parametrize(("b", "n", "d"), [(1, 16, 32), (2, 45, 70)])
def test_graph_propagate_matches_reference(b, n, d, iters):
    x, valid = clustered(b, n, d), pads(b, n, 7)
    got = kernels.graph_propagate(x, valid, 0.5, 0.03, iters)
    ref = gprune.scores(x, 0.5, 0.03, iters, "mask", valid)
    assert got.dtype == torch.float32 and got.shape == (b, n)
    assert torch.equal(torch.isinf(got), torch.isinf(ref)) and torch.isinf(ref).sum() == 7
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("theta", [-1.0, 0.5, 0.99])
def test_graph_propagate_edge_cases_of_the_threshold(theta):
    x, valid = clustered(1, 33, 48, seed=3), pads(1, 33, 0)
    got = kernels.graph_propagate(x, valid, theta, 0.1, 3)
    torch.testing.assert_close(got, gprune.scores(x, theta, 0.1, 3, "mask", valid), rtol=1e-5, atol=1e-6)


def test_graph_propagate_reads_fp16_tokens_in_fp32():
    x = clustered(1, 40, 64, seed=5, dtype=torch.float16)
    valid = pads(1, 40, 0)
    ref = gprune.scores(x, 0.5, 0.03, 3, "mask", valid)
    torch.testing.assert_close(kernels.graph_propagate(x, valid, 0.5, 0.03, 3), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 9, 45])
def test_topk_route_keeps_the_reference_set_in_ascending_order(k):
    x = clustered(2, 45, 70, seed=1)
    scores = gprune.scores(x, 0.5, 0.03, 3, "mask", pads(2, 45, 7))
    tokens, idx = kernels.topk_route(x, scores, k)
    ref = keep_topk(scores, k)
    assert idx.dtype == torch.int64 and torch.equal(idx, ref)
    assert torch.equal(tokens, gather_tokens(x, ref))


def test_topk_route_breaks_ties_towards_the_lower_index_and_gathers_any_dtype():
    scores = torch.tensor([[1.0, 3.0, 3.0, float("-inf"), 2.0, 3.0, float("-inf")]], device=DEVICE)
    x = torch.arange(7 * 3, dtype=torch.float16, device=DEVICE).view(1, 7, 3)
    tokens, idx = kernels.topk_route(x, scores, 4)
    assert idx.tolist() == [[1, 2, 4, 5]]
    assert tokens.dtype == torch.float16 and torch.equal(tokens, x[:, [1, 2, 4, 5]])
    _, idx = kernels.topk_route(x, scores, 6)  # both -inf pads tie: the lower index is kept
    assert idx.tolist() == [[0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="k=8"):
        kernels.topk_route(x, scores, 8)


def test_workspace_buffers_are_aligned_and_disjoint():
    lay = kernels.workspace_layout(2, 45, 70)
    starts = [lay.u, lay.p, lay.norm, *lay.s, lay.deg]
    sizes = [2 * 45 * 70 * 4, 2 * 45 * 45 * 4] + [2 * 45 * 4] * 4
    assert all(s % kernels.ALIGN == 0 for s in starts)
    ends = [s + n for s, n in zip(starts, sizes, strict=True)]
    assert all(e <= nxt for e, nxt in zip(ends, starts[1:], strict=False)) and ends[-1] <= lay.size


def test_plugin_launchers_over_raw_pointers_match_the_tensor_calls():
    """What a TensorRT enqueue does: views over pointers it owns, the workspace carved as laid out."""
    b, n, d, k = 2, 45, 70, 12
    x, valid = clustered(b, n, d, seed=2), pads(b, n, 7)
    scores = torch.full((b, n), float("nan"), device=DEVICE)
    ws = torch.full((kernels.workspace_layout(b, n, d).size,), 255, dtype=torch.uint8, device=DEVICE)
    launch_graph_propagate((b, n, d), x.dtype, x.data_ptr(), valid.data_ptr(), scores.data_ptr(), ws.data_ptr(),
                           0.5, 0.03, 3, device=DEVICE)  # fmt: skip
    assert torch.equal(scores, kernels.graph_propagate(x, valid, 0.5, 0.03, 3))
    tokens = torch.zeros(b, k, d, device=DEVICE)
    idx = torch.full((b, k), -1, dtype=torch.int64, device=DEVICE)
    ws = torch.full((kernels.topk_workspace_bytes(b, n),), 255, dtype=torch.uint8, device=DEVICE)
    launch_topk_route((b, n, d), x.dtype, x.data_ptr(), scores.data_ptr(), tokens.data_ptr(), idx.data_ptr(),
                      ws.data_ptr(), k, device=DEVICE)  # fmt: skip
    assert torch.equal(idx, keep_topk(scores, k)) and torch.equal(tokens, gather_tokens(x, idx))
