"""Prefill compute accounting (ALGORITHMS.md §4.4), in multiply-accumulates (MACs; FLOPs = 2 x MACs).

Per decoder layer, for n tokens (SwiGLU MLP, GQA-aware attention projections):
    n*d*(2*d_q + 2*d_kv)   q, k, v, o projections (d_q = heads*head_dim, d_kv = kv_heads*head_dim)
  + 2*n^2*d_q              QK^T and attention x V, the full square (no causal halving)
  + 3*n*d*m                gate, up and down projections
which is the spec's 4*n*d^2 + 2*n^2*d + 3*n*d*m when d_q = d_kv = d. The LM head adds d*V for the one
position whose logits prefill needs. The pre-LLM stage adds, per group of N tokens: G-Prune N^2*D
(similarity) + T*N^2 (propagation); DivPrune N^2*D (cosine Gram matrix); VisionZip (c + 2)*N*D (CLS
row, key cosines to the c targets, group sums; counted at the width the report passes, see
``visionzip_macs``); random and uniform nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from vtprune import methods
from vtprune.config import PruneConfig


@dataclass(frozen=True)
class TextDims:
    """Decoder shape facts."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def layer_macs(dims: TextDims, n: int, n_kv: int | None = None) -> int:
    """MACs of one decoder layer processing ``n`` query rows against ``n_kv`` key/value rows.

    ``n_kv`` defaults to ``n`` (a plain prefill). ALVTS's "KV-visible skip" projects keys and values
    for every token but runs queries, output projection and MLP only on the ``n`` selected rows.
    """
    n_kv = n if n_kv is None else n_kv
    d, dq, dkv = dims.hidden, dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    return n * d * 2 * dq + n_kv * d * 2 * dkv + 2 * n * n_kv * dq + 3 * n * d * dims.intermediate


def prefill_macs(dims: TextDims, n: int) -> int:
    """MACs of one prefill over ``n`` tokens, logits for the last position only."""
    return dims.layers * layer_macs(dims, n) + dims.hidden * dims.vocab


def layerwise_prefill_macs(dims: TextDims, rows: Sequence[int], kv_rows: Sequence[int] | None = None) -> int:
    """MACs of a prefill whose layer l processes ``rows[l]`` tokens (in-LLM methods), logits as above."""
    kv_rows = rows if kv_rows is None else kv_rows
    if len(rows) != dims.layers or len(kv_rows) != dims.layers:
        raise ValueError(f"need one row count per layer ({dims.layers}), got {len(rows)} and {len(kv_rows)}")
    return sum(layer_macs(dims, n, m) for n, m in zip(rows, kv_rows, strict=True)) + dims.hidden * dims.vocab


def gprune_macs(group_sizes: Sequence[int], dim: int, iters: int) -> int:
    """MACs of the G-Prune stage: similarity matrix plus T mat-vec propagation steps, per group."""
    return sum(n * n * dim + iters * n * n for n in group_sizes)


def visionzip_macs(n: int, d: int, cfg: PruneConfig) -> int:
    """VisionZip's selection and merge on a group of n tokens: the CLS attention row (n*d), the key
    cosines to the c targets (c*n*d) and the group sums (n*d), for a budget of ``cfg.keep`` tokens.

    The work runs at the vision encoder's width C and key head width, not the LLM width d the reports
    pass to every method, so this is a proxy of the right order; the CLS query and key projections it
    recomputes (C^2 + N*C^2) belong to the vision encoder, which prefill MACs do not count either.
    """
    from vtprune.prune.visionzip import split_budget  # here: importing vtprune.flops must not load torch

    keep = cfg.keep if isinstance(cfg.keep, int) else max(1, int(cfg.keep * n + 1e-9))
    if keep >= n:  # every token kept as is: nothing to score
        return 0
    return (split_budget(keep)[1] + 2) * n * d


# Stage costs per group of n tokens of width d, named by the method registry (``vtprune.methods``).
# DivPrune's Gram matrix is its only multiply-accumulate work: the k greedy steps are k*n comparisons
# (min, argmax). random and uniform do index arithmetic only (no stage cost registered).
def gprune_group_macs(n: int, d: int, cfg: PruneConfig) -> int:
    return gprune_macs([n], d, cfg.iters)


def divprune_group_macs(n: int, d: int, cfg: PruneConfig) -> int:
    return n * n * d


def pool_group_macs(n: int, d: int, cfg: PruneConfig) -> int:
    """Average pooling: every token added into one window mean (adaptive bins overlap little)."""
    return n * d


def prune_stage_macs(cfg: PruneConfig, group_sizes: Sequence[int], dim: int) -> int:
    """MACs of the pre-LLM pruning stage over groups of ``group_sizes`` tokens of width ``dim``.

    0 without a pre-LLM stage (method ``none``; in-LLM methods account their selectors per layer).
    """
    cost = methods.get(cfg.method).load("stage_macs") if cfg.pre_llm else None
    if cost is None:
        return 0
    return sum(cost(n, dim, cfg) for n in group_sizes)


@dataclass(frozen=True)
class FlopsReport:
    """Prefill MACs with and without pruning, and the pruning stage's own cost."""

    prefill_macs_unpruned: int
    prefill_macs_pruned: int
    prune_stage_macs: int

    @property
    def saved_fraction(self) -> float:
        """Fraction of unpruned prefill MACs saved, net of the pruning stage's cost."""
        spent = self.prefill_macs_pruned + self.prune_stage_macs
        return 1.0 - spent / self.prefill_macs_unpruned

    def to_dict(self) -> dict[str, float]:
        return asdict(self) | {"saved_fraction": self.saved_fraction}
