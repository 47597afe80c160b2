"""Selection and gathering shared by every pruning method (pure tensor functions, export-friendly)."""

from __future__ import annotations

import torch
from torch import Tensor


def keep_topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest scores, sorted ascending so raster order (and RoPE order) survives.

    Args:
        scores: (B, N) float scores.
        k: static number of tokens to keep, 1 <= k <= N.

    Returns:
        (B, k) int64 indices into N, ascending.
    """
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Gather rows of ``x`` along the token axis: (B, N, D), (B, k) -> (B, k, D)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_positions(position_ids: Tensor, idx: Tensor) -> Tensor:
    """Gather position ids along the last axis: (..., B, L), (B, k) -> (..., B, k).

    Works for 1-D RoPE ids (B, L) and for M-RoPE ids (3, B, L).
    """
    return position_ids.gather(-1, idx.expand(*position_ids.shape[:-2], *idx.shape))


def sort_indices(idx: Tensor) -> Tensor:
    """Sort (B, k) indices ascending."""
    return torch.sort(idx, dim=-1).values
