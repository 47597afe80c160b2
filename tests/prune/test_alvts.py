"""ALVTS selector math: the bilinear form, the factorisations, recall."""

from __future__ import annotations

import torch

from vtprune.prune.alvts import (
    LayerSelector,
    data_free_selector,
    factor_svd,
    factor_whitened,
    logit_scale,
    qk_bilinear,
    recall_at_k,
    select_visual_rows,
)  # fmt: skip
from vtprune.prune.attention import QkWeights


def _weights(bias: bool, heads: int = 4, kv_heads: int = 2, hd: int = 8, d: int = 32, seed: int = 0) -> QkWeights:
    g = torch.Generator().manual_seed(seed)
    qb = torch.randn(heads * hd, generator=g) if bias else None
    kb = torch.randn(kv_heads * hd, generator=g) if bias else None
    return QkWeights(torch.randn(heads * hd, d, generator=g), torch.randn(kv_heads * hd, d, generator=g),
                     qb, kb, heads, kv_heads, hd)  # fmt: skip


def _explicit_head_mean_logits(w: QkWeights, xq, xv):
    """RoPE-free per-head logits q.k / sqrt(hd), averaged over heads, computed the long way."""
    q = (xq @ w.q_weight.T + (w.q_bias if w.q_bias is not None else 0)).view(len(xq), w.heads, w.head_dim)
    k = (xv @ w.k_weight.T + (w.k_bias if w.k_bias is not None else 0)).view(len(xv), w.kv_heads, w.head_dim)
    k = k.repeat_interleave(w.heads // w.kv_heads, dim=1)
    return torch.einsum("ihe,jhe->ij", q, k) / (w.heads * w.head_dim**0.5)


def test_full_rank_factors_reproduce_the_exact_head_summed_logits():
    for bias in (False, True):  # Qwen2 layers have a query/key bias; LLaMA's do not
        w = _weights(bias)
        xq, xv = torch.randn(3, 32), torch.randn(20, 32)
        sel = data_free_selector(w, rank=32)
        exact = _explicit_head_mean_logits(w, xq, xv)
        ours = sel.logits(xq, xv)
        # equal up to terms constant over the visual tokens (they cancel in the softmax over them)
        assert torch.allclose(ours.softmax(-1), exact.softmax(-1), atol=1e-5)
        assert torch.allclose(sel.scores(xq, xv), exact.softmax(-1).mean(0), atol=1e-5)


def test_gqa_bilinear_form_matches_per_head_sum():
    w = _weights(False, heads=6, kv_heads=2)
    m, u = qk_bilinear(w)
    ref = sum(w.q_weight[h * 8:(h + 1) * 8].T @ w.k_weight[(h // 3) * 8:(h // 3 + 1) * 8] for h in range(6))
    assert torch.allclose(m, ref, atol=1e-4) and torch.equal(u, torch.zeros(32))
    assert logit_scale(w) == 1 / (6 * 8**0.5)


def test_svd_truncation_error_decreases_with_rank():
    m = torch.randn(24, 24)
    errs = [torch.linalg.norm(m - a @ b.T).item() for a, b in (factor_svd(m, r) for r in (4, 8, 16, 24))]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4


def test_whitened_factors_beat_plain_svd_on_the_data_they_were_fit_to():
    g = torch.Generator().manual_seed(1)
    d, r = 24, 4
    m = torch.randn(d, d, generator=g)
    mix_q, mix_v = torch.randn(d, d, generator=g) * torch.linspace(3, 0.01, d), torch.randn(d, d, generator=g)
    xq, xv = torch.randn(400, d, generator=g) @ mix_q, torch.randn(400, d, generator=g) @ mix_v.T
    cq, cv = xq.T @ xq / len(xq), xv.T @ xv / len(xv)
    plain, white = factor_svd(m, r), factor_whitened(m, cq, cv, r, eps=1e-8)
    err = [torch.linalg.norm(xq @ (m - a @ b.T) @ xv.T).item() for a, b in (plain, white)]
    assert err[1] < err[0]
    a, b = factor_whitened(m, cq, cv, d, eps=1e-10)  # full rank reproduces M
    assert torch.allclose(a @ b.T, m, atol=1e-3)


def test_truncated_selector_and_cost():
    w = _weights(True)
    sel = data_free_selector(w, rank=16)
    low = sel.truncated(4)
    assert low.rank == 4 and torch.equal(low.a, sel.a[:, :4]) and torch.equal(low.u, sel.u)
    assert sel.macs(1, 100) == 100 * 32 * 16 + 32 * 16 + 100 * 32 + 100 * 16


def test_selection_and_recall():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2])
    assert select_visual_rows(scores, 2).tolist() == [1, 3]
    assert recall_at_k(scores, torch.tensor([0.0, 1.0, 0.9, 0.0, 0.0]), 2) == 0.5
    assert recall_at_k(scores, scores, 3) == 1.0


def test_layer_selector_is_a_plain_value():
    sel = LayerSelector(torch.ones(4, 2), torch.ones(4, 2), torch.zeros(4), 0.5)
    assert sel.rank == 2 and sel.logits(torch.ones(1, 4), torch.ones(3, 4)).shape == (1, 3)


def test_thin_product_svd_equals_the_dense_one():
    from vtprune.prune.alvts import qk_product

    w = _weights(True, heads=6, kv_heads=2, hd=4, d=32)  # rank(M) <= 8 < d
    p, q = qk_product(w)
    m, _ = qk_bilinear(w)
    assert p.shape == (32, 8) and torch.allclose(p @ q.T, m, atol=1e-4)
    for r in (2, 8):
        a1, b1 = factor_svd(m, r)
        a2, b2 = factor_svd((p, q), r)
        assert torch.allclose(a1 @ b1.T, a2 @ b2.T, atol=1e-3)
    cq = torch.eye(32) + 0.1 * torch.ones(32, 32)
    a1, b1 = factor_whitened(m, cq, cq, 8)
    a2, b2 = factor_whitened((p, q), cq, cq, 8)
    assert torch.allclose(a1 @ b1.T, m, atol=1e-3) and torch.allclose(a2 @ b2.T, m, atol=1e-3)


def test_paper_selector_at_full_rank_reproduces_the_head_mean_logits_and_scores():
    from vtprune.prune.alvts import paper_selector

    for bias in (False, True):
        w = _weights(bias)  # GQA: 4 query heads share 2 key heads
        x = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(2))
        sel = paper_selector(w, rank=32)  # full rank: W_Q and W_K exactly
        exact = _explicit_head_mean_logits(w, x[0], x[0])  # (12, 12)
        causal = torch.ones(12, 12, dtype=torch.bool).triu(1)
        probs = exact.masked_fill(causal, float("-inf")).softmax(-1)
        visual, text = torch.arange(2, 8), torch.arange(8, 12)  # 2 system rows, 6 visual, 4 instruction
        v2v = probs[visual][:, visual].sum(0) / torch.arange(6, 0, -1)  # over the visual rows that see it
        t2v = probs[text][:, visual].mean(0)
        got = sel.scores_all(x, visual)[0]  # sums over the rows: the means times per-prompt constants
        assert torch.allclose(got, v2v * (4 * t2v), atol=1e-6)
        assert sel.macs(12) == 2 * 12 * 32 * 32 + 12 * 32 + 12 * 12 * 32


def test_paper_selector_truncation_error_decreases_with_rank():
    from vtprune.prune.alvts import paper_selector

    w = _weights(False, d=32)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    exact = _explicit_head_mean_logits(w, x, x)
    errors = [(paper_selector(w, r).factors.logits(x, x) - exact).norm().item() for r in (4, 8, 16, 32)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3 * errors[0]
