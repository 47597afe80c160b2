"""Average pooling of the visual-token grid to the budget: the downsampling baseline (ALGORITHMS.md §1.8).

A group of N = h x w tokens (raster order) is pooled to a gh x gw grid with gh * gw = K, the factor pair
of K whose aspect is closest to the group's (16 x 16 at K = 64 -> 8 x 8, i.e. 2 x 2 windows; K = 128 ->
16 x 8, 1 x 2 windows). Bins follow adaptive average pooling: cell (i, j) averages rows
[floor(i h / gh), ceil((i + 1) h / gh)) and the same for columns, so any K up to N works, also when h
or w is not a multiple of the pooled grid. Each cell's token takes the place (and so the position id) of
the token at its bin's centre; the centres are distinct and ascending, so the kept set is an ordinary
sorted index set and the rest of the pipeline treats pooling like any selection.

As a ``Selector``: ``scores`` are 1 at the K centre tokens and 0 elsewhere (exact: no ties), ``merge``
replaces each centre token by its bin's mean. Inside an exported graph the merge is one MatMul with a
constant (N, N) matrix: standard ONNX ops.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from vtprune.errors import BudgetError


def pooled_grid(h: int, w: int, k: int) -> tuple[int, int]:
    """(gh, gw) with gh * gw == k, gh <= h, gw <= w, aspect closest to h / w (ties: the taller grid)."""
    pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0 and a <= h and k // a <= w]
    if not pairs:
        raise BudgetError(f"pool cannot lay {k} tokens out as a grid within the {h}x{w} visual-token grid; "
                          "choose a --keep with a factor pair that fits (e.g. a divisor of the grid)")  # fmt: skip
    target = math.log(h / w)
    return min(pairs, key=lambda p: (abs(math.log(p[0] / p[1]) - target), -p[0]))


def _bins(n: int, g: int) -> list[tuple[int, int]]:
    return [((i * n) // g, -((-(i + 1) * n) // g)) for i in range(g)]


@lru_cache(maxsize=64)
def pool_plan(h: int, w: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The K centre tokens (K,) ascending and the (N, N) merge matrix: identity except that each centre's
    row averages its bin. Plain arrays (cached), made tensors where used: constants in a traced graph."""
    gh, gw = pooled_grid(h, w, k)
    n = h * w
    matrix = np.eye(n, dtype=np.float32)
    centres = []
    for r0, r1 in _bins(h, gh):
        for c0, c1 in _bins(w, gw):
            centre = ((r0 + r1 - 1) // 2) * w + (c0 + c1 - 1) // 2
            members = [r * w + c for r in range(r0, r1) for c in range(c0, c1)]
            matrix[centre] = 0.0
            matrix[centre, members] = 1.0 / len(members)
            centres.append(centre)
    idx = np.array(centres, dtype=np.int64)
    if not (idx[1:] > idx[:-1]).all():  # raster order of distinct centres (see the module docstring)
        raise AssertionError(f"pooled centres of {h}x{w} -> {gh}x{gw} are not strictly ascending")
    return idx, matrix


def _grid(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None:
        if grid[0] * grid[1] != n:
            raise ValueError(f"grid {grid} does not hold {n} tokens")
        return grid
    side = math.isqrt(n)
    if side * side != n:
        raise BudgetError(f"pool needs the visual tokens' grid; {n} tokens are not a square grid")
    return side, side


def scores(x: Tensor, valid: Tensor, k: int, grid: tuple[int, int] | None = None) -> Tensor:
    """(B, N) fp32: 1 at the pooled cells' centre tokens, 0 elsewhere (a constant in an exported graph)."""
    idx, _ = pool_plan(*_grid(x.shape[1], grid), k)
    mask = np.zeros(x.shape[1], dtype=np.float32)
    mask[idx] = 1.0
    return torch.tensor(mask, device=x.device).expand(valid.shape)


def merge(x: Tensor, k: int, grid: tuple[int, int] | None = None) -> Tensor:
    """(B, N, D) -> (B, N, D): each centre token replaced by its bin's mean (computed in fp32)."""
    _, matrix = pool_plan(*_grid(x.shape[1], grid), k)
    return torch.matmul(torch.tensor(matrix, device=x.device), x.float()).to(x.dtype)
