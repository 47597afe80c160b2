"""G-Prune on hand-built inputs whose answers are known (ALGORITHMS.md §1)."""

from __future__ import annotations

import pytest
import torch

from vtprune.prune import gprune
from vtprune.prune.select import keep_topk


def _reference_scores(v: torch.Tensor, theta=0.5, tau=0.03, T=5) -> torch.Tensor:
    """The authors' formulation, transcribed: matrix_power(P, T) and sum(P > 0) as degree (one group)."""
    u = v / v.norm(dim=-1, keepdim=True)
    s = u @ u.T
    z = torch.where(s >= theta, s / tau, torch.full_like(s, -5000.0))
    p = z.softmax(dim=-1)
    deg = (p > 0).sum(dim=1)
    w = v.norm(dim=-1)
    return (w @ torch.linalg.matrix_power(p, T)) / deg


def _cluster_and_outlier(n_cluster: int = 10, dim: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(dim)
    base[0] = 1.0
    cluster = base + 0.01 * torch.randn(n_cluster, dim, generator=g)  # near-duplicates
    outlier = torch.zeros(1, dim)
    outlier[0, 1] = 1.0  # orthogonal to the cluster, same norm
    return torch.cat([cluster, outlier])[None]  # (1, 11, D)


def test_outlier_scores_high_and_duplicates_low():
    x = _cluster_and_outlier()
    s = gprune.scores(x)
    assert int(s.argmax()) == 10
    assert s[0, 10] > 5 * s[0, :10].max()  # the cluster shares its mass over 10 neighbours
    assert keep_topk(s, 1).tolist() == [[10]]


def test_matches_reference_formulation():
    x = torch.randn(1, 40, 24, generator=torch.Generator().manual_seed(1))
    x[0, :20] = x[0, :1] + 0.3 * x[0, :20]  # make some edges pass theta
    torch.testing.assert_close(gprune.scores(x)[0], _reference_scores(x[0]), rtol=1e-5, atol=1e-6)


def test_degree_counts_neighbours_with_self_loop():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]]])
    u = x / x.norm(dim=-1, keepdim=True)
    _, mask = gprune.transition(u, theta=0.5, tau=0.03)
    assert mask.sum(dim=-2).tolist() == [[2, 2, 1, 1]]
    assert torch.equal(mask, mask.transpose(-1, -2))


def test_transition_rows_sum_to_one_and_mass_is_conserved():
    x = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(2))
    u = x / x.norm(dim=-1, keepdim=True)
    P, _ = gprune.transition(u, 0.2, 0.03)
    torch.testing.assert_close(P.sum(-1), torch.ones(2, 30))
    s0 = x.norm(dim=-1)
    torch.testing.assert_close(gprune.propagate(s0, P, 5).sum(-1), s0.sum(-1))


def test_iters_zero_is_norm_over_degree():
    x = _cluster_and_outlier()
    s = gprune.scores(x, iters=0)
    assert s[0, 10] == pytest.approx(1.0)  # norm 1, degree 1


def test_fp16_input_scored_in_fp32():
    x = torch.randn(1, 50, 32, generator=torch.Generator().manual_seed(3))
    s16 = gprune.scores(x.half())
    assert s16.dtype == torch.float32
    torch.testing.assert_close(s16, gprune.scores(x.half().float()))


def test_nonzero_degree_mode_never_exceeds_mask_degree_under_fp16():
    x = torch.randn(1, 60, 16, generator=torch.Generator().manual_seed(4))
    x[0, :30] = x[0, :1] + 0.6 * x[0, :30]
    u = x.float() / x.float().norm(dim=-1, keepdim=True)
    _, mask = gprune.transition(u, 0.5, 0.03)
    deg_fp16 = gprune._degree(u, mask, 0.5, 0.03, None, torch.float16)
    assert (deg_fp16 <= mask.sum(-2)).all()
    assert gprune.scores(x.half(), degree="nonzero").isfinite().all()


def test_zero_vector_does_not_produce_nan():
    x = torch.randn(1, 8, 4)
    x[0, 3] = 0.0
    assert gprune.scores(x).isfinite().all()


def test_invalid_tokens_score_minus_inf_and_are_never_kept():
    x = _cluster_and_outlier()
    valid = torch.ones(1, 11, dtype=torch.bool)
    valid[0, 10] = False
    s = gprune.scores(x, valid=valid)
    assert s[0, 10] == float("-inf") and s[0, :10].isfinite().all()
    assert 10 not in keep_topk(s, 5)[0].tolist()


def test_batch_rows_are_independent():
    x = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(5))
    batched = gprune.scores(x)
    for b in range(3):
        torch.testing.assert_close(batched[b : b + 1], gprune.scores(x[b : b + 1]))
