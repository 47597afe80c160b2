"""Pruning methods as pure tensor functions, plus the shared planning step.

A method scores the tokens of one group; ``select_visual`` turns scores into the kept indices of one
image's visual tokens under a ``PruneConfig`` and the image's ``VisualLayout`` (which the model adapter
provides). Nothing here knows about transformers or any model library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.config import METHODS, PruneConfig
from vtprune.errors import BudgetError
from vtprune.prune import gprune
from vtprune.prune.select import gather_tokens, keep_topk

ScoreFn = Callable[[Tensor, PruneConfig], Tensor]  # (B, N, D) group features -> (B, N) scores

SCORERS: dict[str, ScoreFn] = {
    "gprune": lambda x, cfg: gprune.scores(x, cfg.theta, cfg.tau, cfg.iters, cfg.degree),
}
assert set(SCORERS) | {"none"} == set(METHODS), "config.METHODS and the scorer registry disagree"


@dataclass(frozen=True)
class VisualLayout:
    """Structure of one image's visual tokens, as the model adapter lays them out.

    Args:
        num_tokens: N_v, the number of visual tokens the image contributes to the sequence.
        groups: index tensors into [0, N_v); each group is pruned on its own (LLaVA-NeXT: base view and
            high-res grid; LLaVA-1.5 and Qwen2.5-VL: one group).
        always_keep: indices kept whatever the budget (LLaVA-NeXT ``image_newline`` tokens).
        names: a label per group, for reports.
    """

    num_tokens: int
    groups: tuple[Tensor, ...]
    always_keep: Tensor
    names: tuple[str, ...]

    @property
    def prunable(self) -> int:
        return sum(int(g.numel()) for g in self.groups)


def group_budgets(sizes: Sequence[int], keep: int | float) -> list[int]:
    """Tokens to keep per group.

    An int K is split over the groups in proportion to their sizes (largest remainders first), so the
    total is exactly K. A float rho keeps ``max(1, floor(rho * n))`` of each group, as the reference does.
    """
    total = sum(sizes)
    if isinstance(keep, float):
        return [min(n, max(1, int(keep * n + 1e-9))) for n in sizes]
    if keep > total:
        raise BudgetError(f"--keep {keep} is larger than the {total} prunable visual tokens this image has")
    shares = [keep * n / total for n in sizes]
    out = [int(s) for s in shares]
    order = sorted(range(len(sizes)), key=lambda i: (out[i] - shares[i], i))  # largest remainder first
    for i in order[: keep - sum(out)]:
        out[i] += 1
    return out


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
    if not cfg.prunes:
        return torch.arange(layout.num_tokens, device=x.device).expand(batch, -1)
    budgets = group_budgets([int(g.numel()) for g in layout.groups], cfg.keep)
    kept = [layout.always_keep.to(x.device).expand(batch, -1)]
    for idx, k in zip(layout.groups, budgets, strict=True):
        idx = idx.to(x.device)
        feats = gather_tokens(x, idx.expand(batch, -1))  # (B, N_g, D)
        local = keep_topk(SCORERS[cfg.method](feats, cfg), k)  # (B, k) into the group
        kept.append(idx[local])  # (B, k) into N_v
    return torch.cat(kept, dim=-1).sort(dim=-1).values  # raster order keeps RoPE positions monotone
