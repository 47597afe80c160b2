"""ALVTS: adaptive layer-wise visual token selection with a low-rank attention proxy (ALGORITHMS.md §2).

Pure tensor functions and the selector objects; the layer loop that applies them lives in
``vtprune.runtime.layerwise`` and the calibration in ``vtprune.calib``.

Summed over heads, a layer's RoPE-free attention logit between tokens i and j is a bilinear form

    sum_h q_i^h . k_j^h = x_i M x_j^T + x_j . u + (terms constant in j),
    M = sum_h W_Q^h (W_K^g(h))^T,   u = sum_h W_K^g(h) b_Q^h

(g(h) the KV group under GQA, b_Q the query bias that Qwen2 layers have). The selector keeps ``u``
exactly (one extra d-vector) and factors M ~= A B^T with A, B in R^{d x r}: data-free by the SVD of M, or
calibrated by whitening with the second moments of the layer's normalised inputs (§2.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.prune.attention import QkWeights
from vtprune.prune.select import keep_topk


@dataclass(frozen=True)
class LayerSelector:
    """One layer's selector: ``a``, ``b`` (d, r) factors, ``u`` (d,) key-bias term, logit ``scale``."""

    a: Tensor
    b: Tensor
    u: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def logits(self, x_q: Tensor, x_v: Tensor) -> Tensor:
        """(..., n_q, d), (..., N_v, d) normalised hidden states -> (..., n_q, N_v) approximate head-mean
        logits (leading batch dims optional)."""
        x_q, x_v = x_q.float(), x_v.float()
        return ((x_q @ self.a) @ (x_v @ self.b).transpose(-1, -2) + (x_v @ self.u).unsqueeze(-2)) * self.scale

    def scores(self, x_q: Tensor, x_v: Tensor) -> Tensor:
        """Importance of each visual token: softmax over the visual tokens, averaged over the queries
        (..., N_v)."""
        return self.logits(x_q, x_v).softmax(dim=-1).mean(dim=-2)

    def macs(self, n_q: int, n_v: int) -> int:
        """Cost of ``scores`` (see ``lowrank_selector_macs``)."""
        return lowrank_selector_macs(self.a.shape[0], self.rank, n_q, n_v)

    # The interface every ALVTS selector gives the router (``runtime.layerwise.AlvtsRouter``).
    def layer_scores(self, x: Tensor, rope: tuple[Tensor, Tensor], visual: Tensor, query: Tensor) -> Tensor:
        """(B, L, d) a layer's normalised input -> (B, N_v) scores of the ``visual`` rows from the ``query``
        rows (``rope`` unused: the proxy is RoPE-free)."""
        return self.scores(x.index_select(1, query), x.index_select(1, visual))

    def layer_macs(self, n_rows: int, n_q: int, n_v: int) -> int:
        return self.macs(n_q, n_v)

    def truncated(self, rank: int) -> LayerSelector:
        """The same selector at a lower rank (factors are stored in descending singular-value order)."""
        return LayerSelector(self.a[:, :rank], self.b[:, :rank], self.u, self.scale)

    def rescaled(self, s: Tensor) -> LayerSelector:
        """The same scores for inputs divided channel-wise by ``s`` (d,) (a SmoothQuant-ed RMSNorm,
        ``export.smooth``): ``(x / s) @ (s * a) == x @ a``."""
        s = s.to(self.a.dtype)
        return LayerSelector(self.a * s[:, None], self.b * s[:, None], self.u * s, self.scale)


def lowrank_selector_macs(d: int, rank: int, n_q: int, n_v: int) -> int:
    """MACs of one rank-r selector: visual keys, queries, key-bias term and the score matrix."""
    return n_v * d * rank + n_q * d * rank + n_v * d + n_q * n_v * rank


def qk_product(w: QkWeights) -> tuple[Tensor, Tensor]:
    """M as a product P Q^T of thin (d, e) factors, e = H_kv * hd: the query heads of a KV group add up
    before meeting their shared key head, so M has rank <= e (GQA makes it much smaller than d)."""
    wq, wk = w.per_head()  # (H, hd, d) each, key heads repeated
    group = w.heads // w.kv_heads
    p = wq.view(w.kv_heads, group, w.head_dim, -1).sum(dim=1).reshape(-1, wq.shape[-1])  # (e, d)
    q = wk.view(w.kv_heads, group, w.head_dim, -1)[:, 0].reshape(-1, wk.shape[-1])  # (e, d)
    return p.T, q.T


def qk_bilinear(w: QkWeights) -> tuple[Tensor, Tensor]:
    """M (d, d) and u (d,) of a layer's head-summed, RoPE-free q.k logits, in fp32 (GQA-aware)."""
    p, q = qk_product(w)
    wq, wk = w.per_head()
    if w.q_bias is None:
        u = torch.zeros(p.shape[0])
    else:
        u = torch.einsum("hef,he->f", wk, w.q_bias.float().view(w.heads, w.head_dim))
    return p @ q.T, u


def product_svd(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of P Q^T for thin (d, e) factors, through two QRs and an (e, e) core: U (d, e), S (e,), V (d, e)."""
    qa, ra = torch.linalg.qr(p.double())
    qb, rb = torch.linalg.qr(q.double())
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    return qa @ u, s, qb @ vh.T


def logit_scale(w: QkWeights) -> float:
    """1 / (H * sqrt(hd)): turns head-summed logits into the head-mean of the model's scaled logits."""
    return 1.0 / (w.heads * w.head_dim**0.5)


def factor_svd(m: Tensor | tuple[Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    """Data-free factors: M = U S V^T, A = U_r S_r^1/2, B = V_r S_r^1/2. ``m`` is M, or (P, Q) with M = P Q^T."""
    u, s, v = product_svd(*m) if isinstance(m, tuple) else _svd(m)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (v[:, :rank] * root).float()


def _svd(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(m.double())
    return u, s, vh.T


def factor_whitened(m: Tensor | tuple[Tensor, Tensor], c_q: Tensor, c_v: Tensor, rank: int,
                    eps: float = 1e-4) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Calibrated factors minimising E||x_Q (M - A B^T) x_V^T||^2 (§2.3, whitened truncated SVD).

    Args:
        m: the (d, d) bilinear form M, or thin factors (P, Q) with M = P Q^T.
        c_q, c_v: (d, d) second moments of query-set and visual-token inputs; ``eps`` times their mean
            diagonal is added for numerical stability.
        rank: r.
    """
    rq, rq_inv = _sqrt_and_inverse(c_q, eps)
    rv, rv_inv = _sqrt_and_inverse(c_v, eps)
    if isinstance(m, tuple):
        u, s, v = product_svd(rq @ m[0].double(), rv @ m[1].double())
    else:
        u, s, v = _svd(rq @ m.double() @ rv)
    root = s[:rank].sqrt()
    return (rq_inv @ (u[:, :rank] * root)).float(), (rv_inv @ (v[:, :rank] * root)).float()


def _sqrt_and_inverse(c: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    c = c.double()
    c = c + eps * c.diagonal().mean().clamp_min(1e-12) * torch.eye(c.shape[0], dtype=c.dtype)
    vals, vecs = torch.linalg.eigh(c)
    vals = vals.clamp_min(1e-12)
    return (vecs * vals.sqrt()) @ vecs.T, (vecs * vals.rsqrt()) @ vecs.T


@dataclass(frozen=True)
class PaperSelector:
    """The selector as the ALVTS paper describes it (ALGORITHMS.md §2.1b): separate rank-R factors of the
    layer's W_Q and W_K give RoPE-free, head-mean attention logits among *all* rows (text and visual),
    causal, softmax over the keys; a visual token's score is the mean attention it receives from the visual
    rows times the mean it receives from the text rows after the image, S = S_V2V * S_T2V.

    ``factors`` holds a (the query factor V_Q S_Q) and b (the key factor with the mixing U_K^T U_Q folded
    in), so that x_i a b^T x_j^T equals the rank-R query and key projections' head-summed dot product;
    GQA key heads are repeated to their query heads before the key SVD.
    """

    factors: LayerSelector

    @property
    def rank(self) -> int:
        return self.factors.rank

    def rescaled(self, s: Tensor) -> PaperSelector:
        """See ``LayerSelector.rescaled``."""
        return PaperSelector(self.factors.rescaled(s))

    def scores_all(self, x: Tensor, visual: Tensor) -> Tensor:
        """(B, L, d) normalised rows in sequence order, (N_v,) visual rows -> (B, N_v) scores.

        S_V2V is the mean attention a visual token receives from the visual rows that can attend to it
        (under the causal mask, those at or after it: a plain mean over all visual rows, or a sum, ranks the
        first visual tokens highest by construction and keeps the image's top rows, measured). S_T2V is the
        attention it receives summed over the text rows (every non-visual row: those before the image see no
        visual token, so this is the mean over the instruction rows times a per-prompt constant, which
        leaves the ranking, the tie margins and the calibration's mean-1 targets unchanged). Visual rows
        ascending. Static shapes: exportable.
        """
        logits = self.factors.logits(x, x)  # (B, L, L) head-mean logits at rank R
        n = x.shape[-2]
        future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        probs = logits.masked_fill(future, float("-inf")).softmax(dim=-1)
        to_visual = probs.index_select(-1, visual)  # (B, L, N_v)
        from_visual = to_visual.index_select(-2, visual).sum(dim=-2)  # (B, N_v)
        t2v = to_visual.sum(dim=-2) - from_visual
        seen_by = visual.shape[0] - torch.arange(visual.shape[0], device=x.device)  # visual rows at or after each
        return from_visual / seen_by * (t2v + 1e-12)  # a prompt ending at the image: rank by V2V alone

    def macs(self, n_rows: int) -> int:
        return paper_selector_macs(self.factors.a.shape[0], self.rank, n_rows)

    def layer_scores(self, x: Tensor, rope: tuple[Tensor, Tensor], visual: Tensor, query: Tensor) -> Tensor:
        """The router's interface (``LayerSelector.layer_scores``): every row takes part, not a query set."""
        return self.scores_all(x, visual)

    def layer_macs(self, n_rows: int, n_q: int, n_v: int) -> int:
        return self.macs(n_rows)


def paper_selector_macs(d: int, rank: int, n_rows: int) -> int:
    """MACs of the paper's selector on L = ``n_rows`` rows: rank-R queries and keys of every row, the
    key-bias term and the (L, L) logits."""
    return 2 * n_rows * d * rank + n_rows * d + n_rows * n_rows * rank


@torch.no_grad()
def paper_selector(w: QkWeights, rank: int) -> PaperSelector:
    """SVD initialisation of the paper's factors: W_Q ~ U_Q S_Q V_Q^T and W_K (key heads repeated) ~
    U_K S_K V_K^T at rank R; a = V_Q S_Q, b = V_K S_K U_K^T U_Q."""
    wq, wk = w.per_head()  # (H, hd, d) each
    d = wq.shape[-1]
    uq, sq, vq = _svd(wq.reshape(-1, d))  # (H*hd, d) = U S V^T
    uk, sk, vk = _svd(wk.reshape(-1, d))
    r = min(rank, d, uq.shape[1])
    a = vq[:, :r] * sq[:r]
    b = (vk[:, :r] * sk[:r]) @ (uk[:, :r].T @ uq[:, :r])
    _, u = qk_bilinear(w)
    return PaperSelector(LayerSelector(a.float(), b.float(), u, logit_scale(w)))


def data_free_selector(w: QkWeights, rank: int) -> LayerSelector:
    p, q = qk_product(w)
    _, u = qk_bilinear(w)
    a, b = factor_svd((p, q), min(rank, p.shape[1]))
    return LayerSelector(a, b, u, logit_scale(w))


def select_visual_rows(scores: Tensor, k: int) -> Tensor:
    """The k highest-scoring visual tokens, ascending (sorted by position): (N_v,) -> (k,)."""
    return keep_topk(scores[None], k)[0]


def recall_at_k(approx: Tensor, exact: Tensor, k: int) -> float:
    """|top-k(approx) & top-k(exact)| / k for (N,) score vectors."""
    a = set(approx.topk(k).indices.tolist())
    return len(a & set(exact.topk(k).indices.tolist())) / k
