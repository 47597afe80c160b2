"""Pruning methods as pure tensor functions, plus the shared planning step.

A pre-LLM method is a ``Selector``: budget-aware scores of one group's tokens whose top-k is the kept
set. ``select_visual`` applies it to each group of one image's visual tokens under a ``PruneConfig``
and the image's ``VisualLayout`` (which the model adapter provides). Encoder methods (VisionZip) score
the encoder's per-patch evidence instead of the projector output and also ``merge`` the features before
the projector (``merge_visual``). Nothing here knows about transformers or any model library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune import methods
from vtprune.config import PruneConfig
from vtprune.errors import BudgetError
from vtprune.prune import baselines, gprune, pool, visionzip
from vtprune.prune.select import gather_tokens, keep_topk
from vtprune.prune.ties import as_mask, exact_margin, topk_margin

# (B, N, D) group features, (B, N) bool valid, static k, config -> (B, N) fp32 scores
ScoreFn = Callable[[Tensor, Tensor, int, PruneConfig], Tensor]
# (B, N, C) features, (B, N, E) evidence, (B, N) bool valid, static k, config, optional (B, k) kept set to
# follow -> (B, N, C) merged features
MergeFn = Callable[[Tensor, Tensor, Tensor, int, PruneConfig, Tensor | None], Tensor]
# the ScoreFn inputs plus (B, k) another backend's kept set -> (B,) float64 tie margin (see ``ties``)
MarginFn = Callable[[Tensor, Tensor, int, PruneConfig, Tensor], Tensor]
Grid = tuple[int, int] | None  # a group's (h, w) visual-token grid, raster order


@dataclass(frozen=True)
class Selector:
    """A pre-LLM method. ``scores`` are budget-aware: their ``k`` largest entries are the kept tokens
    (the export graph feeds them to ``vtprune::TopKRoute``); calling the selector returns those indices.

    An encoder method also has ``merge``: its ``scores`` read the encoder's per-patch evidence (the
    adapter's ``encoder_tokens``) instead of the projector output, and ``merge`` rewrites the kept
    tokens' pre-projector features (VisionZip: each contextual token is its group's mean).

    ``margin`` judges another backend's kept set (``ties``): by default the top-k inversion of ``scores``;
    methods whose scores are ranks or flags replay their own decisions instead.

    A pre-LLM method may also ``merge`` (pooling: each kept token becomes its window's mean); it then
    reads the projector output as both features and evidence. A ``grid`` method (pooling) needs the
    group's (h, w) token grid: its functions take it as one more argument (``grid=``).
    """

    scores: ScoreFn
    merge: MergeFn | None = None
    margin: MarginFn | None = None
    grid: bool = False

    def __call__(self, x: Tensor, valid: Tensor, k: int, cfg: PruneConfig, grid: Grid = None) -> Tensor:
        """(B, N, D), (B, N) bool, k -> (B, k) int64 indices into N, ascending; invalid slots never
        chosen while valid ones remain."""
        return keep_topk(self.group_scores(x, valid, k, cfg, grid), k)

    def group_scores(self, x: Tensor, valid: Tensor, k: int, cfg: PruneConfig, grid: Grid = None) -> Tensor:
        """``scores``, given the group's grid when the method needs it."""
        return self.scores(x, valid, k, cfg, grid=grid) if self.grid else self.scores(x, valid, k, cfg)

    def group_merge(
        self, x: Tensor, ev: Tensor, valid: Tensor, k: int, cfg: PruneConfig, follow: Tensor | None, grid: Grid = None
    ) -> Tensor:
        """``merge``, given the group's grid when the method needs it."""
        assert self.merge is not None
        if self.grid:
            return self.merge(x, ev, valid, k, cfg, follow, grid=grid)
        return self.merge(x, ev, valid, k, cfg, follow)

    def tie_margin(
        self, x: Tensor, valid: Tensor, k: int, cfg: PruneConfig, target: Tensor, grid: Grid = None
    ) -> Tensor:
        """(B,) float64: how far keeping ``target`` (B, k) lies from this method's choice (0 when it is
        that choice), relative to the range of the method's decision values."""
        if self.margin is not None:
            return self.margin(x, valid, k, cfg, target, grid=grid) if self.grid else self.margin(
                x, valid, k, cfg, target)  # fmt: skip
        return topk_margin(self.group_scores(x, valid, k, cfg, grid), target)


def _exact(scores: ScoreFn) -> MarginFn:
    """The margin of a method computed in integer arithmetic: no near-ties, so any other set is refused."""
    return lambda x, valid, k, cfg, target: exact_margin(keep_topk(scores(x, valid, k, cfg), k), target)


def _random_scores(x: Tensor, valid: Tensor, k: int, cfg: PruneConfig) -> Tensor:
    return baselines.random_scores(valid, cfg.seed)


def _uniform_scores(x: Tensor, valid: Tensor, k: int, cfg: PruneConfig) -> Tensor:
    return baselines.uniform_scores(valid, k)


def _pool_scores(x: Tensor, valid: Tensor, k: int, cfg: PruneConfig, grid: Grid = None) -> Tensor:
    return pool.scores(x, valid, k, grid)


def _pool_margin(x: Tensor, valid: Tensor, k: int, cfg: PruneConfig, target: Tensor, grid: Grid = None) -> Tensor:
    return exact_margin(keep_topk(pool.scores(x, valid, k, grid), k), target)


# The built-in pre-LLM selectors, registered by import path in ``vtprune.methods``.
GPRUNE = Selector(lambda x, valid, k, cfg: gprune.scores(x, cfg.theta, cfg.tau, cfg.iters, cfg.degree, valid))
RANDOM = Selector(_random_scores, margin=_exact(_random_scores))
UNIFORM = Selector(_uniform_scores, margin=_exact(_uniform_scores))
DIVPRUNE = Selector(lambda x, valid, k, cfg: baselines.divprune_scores(x, valid, k),
                    margin=lambda x, valid, k, cfg, target: baselines.divprune_margin(x, valid, k, target))
POOL = Selector(_pool_scores, lambda x, ev, valid, k, cfg, follow, grid=None: pool.merge(x, k, grid),
                _pool_margin, grid=True)
VISIONZIP = Selector(lambda ev, valid, k, cfg: visionzip.scores(ev, valid, k),
                     lambda x, ev, valid, k, cfg, follow: visionzip.merge(x, ev, valid, k, follow),
                     lambda ev, valid, k, cfg, target: visionzip.margin(ev, valid, k, target))


def selector(name: str) -> Selector:
    """The registered pre-LLM method ``name``'s selector (``vtprune.methods``)."""
    return methods.get(name).load("selector")


@dataclass(frozen=True)
class VisualLayout:
    """Structure of one image's visual tokens, as the model adapter lays them out.

    Args:
        num_tokens: N_v, the number of visual tokens the image contributes to the sequence.
        groups: index tensors into [0, N_v); each group is pruned on its own (LLaVA-NeXT: base view and
            high-res grid; LLaVA-1.5 and Qwen2.5-VL: one group).
        always_keep: indices kept whatever the budget (LLaVA-NeXT ``image_newline`` tokens).
        names: a label per group, for reports.
        capacities: largest size of each group for this model (default: its size).
        grids: each group's (h, w) token grid in raster order, where it is one (pooling reads it); None:
            square groups are read as square grids.
    """

    num_tokens: int
    groups: tuple[Tensor, ...]
    always_keep: Tensor
    names: tuple[str, ...]
    capacities: tuple[int, ...] | None = None
    grids: tuple[Grid, ...] | None = None

    def grid(self, i: int) -> Grid:
        return self.grids[i] if self.grids is not None else None

    @property
    def sizes(self) -> list[int]:
        return [int(g.numel()) for g in self.groups]

    @property
    def prunable(self) -> int:
        return sum(self.sizes)

    @property
    def group_capacities(self) -> list[int]:
        """Largest size each group can have for this model (LLaVA-NeXT's high-res grid varies per image)."""
        return list(self.capacities) if self.capacities is not None else self.sizes

    def budgets(self, keep: int | float) -> list[int]:
        return group_budgets(self.sizes, keep, self.group_capacities)


def group_budgets(sizes: Sequence[int], keep: int | float, capacities: Sequence[int] | None = None) -> list[int]:
    """Tokens to keep per group.

    An int K is split over the groups in proportion to their *capacities* (largest remainders first), so
    the split is the same for every image of a model and exported graphs keep static shapes; a group
    smaller than its share keeps all its tokens. A float rho keeps ``max(1, floor(rho * n))`` of each
    group, as the reference code does.
    """
    caps = list(capacities) if capacities is not None else list(sizes)
    if isinstance(keep, float):
        return [min(n, max(1, int(keep * n + 1e-9))) for n in sizes]
    if keep > sum(caps):
        raise BudgetError(f"--keep {keep} is larger than the {sum(caps)} prunable visual tokens this model has")
    shares = [keep * c / sum(caps) for c in caps]
    out = [int(x) for x in shares]
    order = sorted(range(len(caps)), key=lambda i: (out[i] - shares[i], i))  # largest remainder first
    for i in order[: keep - sum(out)]:
        out[i] += 1
    return [min(k, n) for k, n in zip(out, sizes, strict=True)]


def select_visual(x: Tensor, layout: VisualLayout, cfg: PruneConfig) -> Tensor:
    """Kept visual-token indices for one image batch.

    Args:
        x: (B, N_v, D) visual tokens as they enter the language model (projector/merger output).
        layout: the adapter's grouping of those tokens.
        cfg: method and budget.

    Returns:
        (B, K_total) int64 indices into N_v, ascending; K_total = sum of group budgets + always_keep.
    """
    batch = x.shape[0]
    if not cfg.pre_llm:  # nothing to choose before the LLM (no pruning, or an in-LLM method)
        return torch.arange(layout.num_tokens, device=x.device).expand(batch, -1)
    budgets = layout.budgets(cfg.keep)
    kept = [layout.always_keep.to(x.device).expand(batch, -1)]
    for i, (idx, k) in enumerate(zip(layout.groups, budgets, strict=True)):
        idx = idx.to(x.device)
        feats = gather_tokens(x, idx.expand(batch, -1))  # (B, N_g, D)
        valid = torch.ones(feats.shape[:2], dtype=torch.bool, device=x.device)
        local = selector(cfg.method)(feats, valid, k, cfg, layout.grid(i))  # (B, k) into the group
        kept.append(idx[local])  # (B, k) into N_v
    return torch.cat(kept, dim=-1).sort(dim=-1).values  # raster order keeps RoPE positions monotone


def merge_visual(
    x: Tensor, evidence: Tensor, layout: VisualLayout, cfg: PruneConfig, follow: Tensor | None = None
) -> Tensor:
    """An encoder method's merged features, group by group (identity for other methods).

    Args:
        x: (B, N_v, C) pre-projector features in the visual-token order of ``layout``.
        evidence: (B, N_v, E) the encoder's per-token evidence, same order.
        layout: the adapter's grouping.
        cfg: method and budget.
        follow: optional (1, K) kept indices into N_v of another backend, whose merge to reproduce.

    Returns:
        (B, N_v, C); gathering ``select_visual(evidence, layout, cfg)`` (or ``follow``) from it gives the
        kept tokens.
    """
    method = selector(cfg.method) if cfg.pre_llm else None
    if method is None or method.merge is None:
        return x
    out = x.clone()
    batch = x.shape[0]
    locals_ = group_members(follow, layout) if follow is not None else [None] * len(layout.groups)
    for i, (idx, k, local) in enumerate(zip(layout.groups, layout.budgets(cfg.keep), locals_, strict=True)):
        idx = idx.to(x.device).expand(batch, -1)
        feats, ev = gather_tokens(x, idx), gather_tokens(evidence, idx)  # (B, N_g, C), (B, N_g, E)
        valid = torch.ones(feats.shape[:2], dtype=torch.bool, device=x.device)
        follow_g = None if local is None else local[None]
        merged = method.group_merge(feats, ev, valid, k, cfg, follow_g, layout.grid(i))
        out.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), merged)
    return out


def group_members(keep: Tensor, layout: VisualLayout) -> list[Tensor]:
    """Per group, the positions within the group of the kept tokens: (1, K) indices into N_v -> [(k_g,)]."""
    kept = as_mask(keep, layout.num_tokens)[0]  # (N_v,)
    return [kept[idx.to(kept.device)].nonzero().squeeze(-1) for idx in layout.groups]


def tie_margins(x: Tensor, layout: VisualLayout, cfg: PruneConfig, keep: Tensor) -> list[float]:
    """Per group, the tie margin (``ties``) of another backend's kept set under ``cfg``'s method.

    Args:
        x: (1, N_v, D) what the method scores (projector output, or the encoder's evidence).
        layout, cfg: as for ``select_visual``.
        keep: (1, K) the other backend's kept indices into N_v.

    Returns:
        One float per group: 0 for the method's own choice; +inf where the group keeps another number of
        tokens, or an always-kept token is missing.
    """
    if not cfg.pre_llm:
        return [0.0 if keep.shape[-1] == layout.num_tokens else float("inf")]
    if not as_mask(keep, layout.num_tokens)[0, layout.always_keep].all():
        return [float("inf")]
    out = []
    groups = zip(layout.groups, layout.budgets(cfg.keep), group_members(keep, layout), strict=True)
    for i, (idx, k, local) in enumerate(groups):
        if local.numel() != k:
            out.append(float("inf"))
            continue
        feats = gather_tokens(x, idx.to(x.device)[None])  # (1, N_g, D)
        valid = torch.ones(feats.shape[:2], dtype=torch.bool, device=x.device)
        out.append(float(selector(cfg.method).tie_margin(feats, valid, k, cfg, local[None], layout.grid(i))[0]))
    return out
