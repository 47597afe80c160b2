"""Training-free baselines that choose visual tokens before the language model (ALGORITHMS.md §3):
``random`` (seeded), ``uniform`` (spatially strided) and ``divprune`` (greedy Max-Min diversity).

Each method is a budget-aware *score*: a (B, N) fp32 tensor whose ``k`` largest entries are exactly
the tokens the method keeps, with a strict gap between the kept set and the rest, so a top-k (eager
``keep_topk`` or the exported ``vtprune::TopKRoute``) recovers the same set whatever its tie-breaking.

Invalid slots (padding of a static-shape graph) always score below every valid token and among
themselves prefer earlier positions: they are chosen only when the budget exceeds the valid tokens.
Valid tokens are addressed by their *rank* among the valid ones, so a padded group and the same group
without padding make identical choices (exported graph and eager pipeline agree).

Pure tensor functions: no I/O, no model-library imports, static shapes for a static ``k``, no Python
RNG (``random`` hashes its seed with SplitMix64 into a constant table).
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

from vtprune.prune.ties import as_mask, follow_topk

_MASK64 = (1 << 64) - 1


def pad_scores(valid: Tensor) -> Tensor:
    """Scores of invalid slots: -1 - position, below any valid score and earliest padding first.

    Args:
        valid: (B, N) bool.

    Returns:
        (B, N) fp32; exact for N < 2**24.
    """
    pos = torch.arange(valid.shape[-1], device=valid.device, dtype=torch.float32)
    return (-1.0 - pos).expand(valid.shape)


def valid_rank(valid: Tensor) -> Tensor:
    """Rank of each valid token among the valid ones, in raster order: (B, N) bool -> (B, N) int64.

    Invalid slots get the rank of the valid token before them (never used).
    """
    # float cumsum is exact below 2**24 and is the CumSum variant every runtime implements
    return (valid.float().cumsum(dim=-1) - 1.0).clamp_min(0.0).long()


# --- random --------------------------------------------------------------------------------------
def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@cache
def _priority_table(seed: int, n: int) -> tuple[int, ...]:
    """Position of rank r in the ascending order of SplitMix64((seed << 32) | r), r in [0, n).

    SplitMix64 is a bijection, so the keys never tie; the relative order of ranks [0, m) is the same
    for every n >= m, which is what keeps padded and unpadded groups in agreement.
    """
    order = sorted(range(n), key=lambda r: _splitmix64((seed << 32) | r))
    table = [0] * n
    for place, r in enumerate(order):
        table[r] = place
    return tuple(table)


def random_scores(valid: Tensor, seed: int) -> Tensor:
    """Seeded uniform random choice among the valid tokens.

    The top-k of these scores is a uniformly distributed k-subset of the valid tokens (over seeds);
    the same seed always gives the same subset.

    Args:
        valid: (B, N) bool mask of real tokens.
        seed: integer in [0, 2**32).

    Returns:
        (B, N) fp32: distinct integers in [0, N) for valid tokens, ``pad_scores`` for the others.
    """
    table = torch.tensor(_priority_table(seed, valid.shape[-1]), dtype=torch.float32, device=valid.device)
    prio = table[valid_rank(valid)]  # (B, N) constant table gathered by valid rank
    return torch.where(valid, prio, pad_scores(valid))


# --- uniform -------------------------------------------------------------------------------------
def _strided(pos: Tensor, count: Tensor | int, length: Tensor | int) -> tuple[Tensor, Tensor]:
    """Is ``pos`` one of the ``count`` centred, evenly spaced picks floor((2j+1) * length / (2 * count)),
    j in [0, count), among ``length`` positions? Returns (member, j), broadcast int64 tensors; needs
    1 <= count <= length (picks are then distinct). Integer math only, every operand non-negative.
    """
    two_len = 2 * length
    j = ((2 * count * pos - length).clamp_min(0) + two_len - 1) // two_len  # smallest j whose pick >= pos
    return (j < count) & ((2 * j + 1) * length < 2 * count * (pos + 1)), j


def _isqrt(n: Tensor) -> Tensor:
    s = n.float().sqrt().floor().long()  # exact or one off for n < 2**24; corrected below
    s = s - (s * s > n).long()
    return s + ((s + 1) * (s + 1) <= n).long()


def _lattice(rank: Tensor, side: Tensor, k: int) -> Tensor:
    """Membership of the 2-D rule on a ``side`` x ``side`` grid (needs k <= side**2): ``a`` lattice rows,
    a = max(isqrt(k), ceil(k / side)), row i holding floor((i+1)k/a) - floor(ik/a) evenly spaced columns."""
    rows = ((k + side - 1) // side).clamp_min(math.isqrt(k))  # (B, 1) lattice rows a
    row_member, i = _strided(rank // side, rows, side)
    per_row = ((i + 1) * k) // rows - (i * k) // rows  # columns in lattice row i, 1 <= per_row <= side
    col_member, _ = _strided(rank % side, per_row.clamp_min(1), side)
    return row_member & col_member


def uniform_scores(valid: Tensor, k: int) -> Tensor:
    """Spatially uniform choice of ``k`` among the valid tokens, by their raster rank r in [0, n).

    Rule (n valid tokens, budget k <= n):

    - n a perfect square s*s (a square grid: pocket 16x16, LLaVA 24x24): a 2-D lattice of
      a = max(isqrt(k), ceil(k / s)) rows at floor((2i+1)s / 2a); lattice row i holds
      floor((i+1)k/a) - floor(ik/a) columns at floor((2j+1)s / 2c_i). k = 64 of 16x16 is the 8x8
      lattice at odd rows and columns; k = a*a is always an a x a lattice.
    - otherwise: ranks floor((2j+1)n / 2k), j in [0, k), evenly spaced in raster order.
    - k >= n: every valid token.

    A non-square grid whose token count happens to be a perfect square is treated as square: the
    choice stays spread out but is not a lattice of the true grid.

    Args:
        valid: (B, N) bool mask of real tokens, in raster order.
        k: static budget.

    Returns:
        (B, N) fp32: 1 for chosen tokens, 0 for other valid ones, ``pad_scores`` for invalid slots.
    """
    if k == 0:  # a group whose share of an integer budget rounds to nothing
        return torch.where(valid, 0.0, pad_scores(valid))
    rank = valid_rank(valid)  # (B, N)
    n = valid.long().sum(dim=-1, keepdim=True)  # (B, 1) valid tokens
    side = _isqrt(n).clamp_min(1)
    strided, _ = _strided(rank, k, n.clamp_min(1))
    square = side * side == n  # (B, 1)
    chosen = (square & _lattice(rank, side, k)) | (~square & strided)  # And/Or: ORT has no bool Where
    chosen = valid & (chosen | (n <= k))  # a budget of every valid token keeps them all
    return torch.where(chosen, 1.0, torch.where(valid, 0.0, pad_scores(valid)))


# --- DivPrune ------------------------------------------------------------------------------------
def cosine_distance(x: Tensor) -> Tensor:
    """Pairwise 1 - cos in fp32: (B, N, D) -> (B, N, N). Zero vectors are at distance 1 from all."""
    v = x.float()
    u = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return 1.0 - u @ u.transpose(-1, -2)  # (B, N, N)


def isolation(dist: Tensor, valid: Tensor) -> Tensor:
    """Distance of each token to its nearest *other* valid token: (B, N, N), (B, N) -> (B, N) fp32.

    +inf for a token with no other valid token (a group of one).
    """
    n = dist.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    others = valid.unsqueeze(-2) & ~eye  # (B, N, N): column i is a valid token other than row j
    return torch.where(others, dist, float("inf")).amin(dim=-1)


def divprune_order(x: Tensor, valid: Tensor, k: int) -> Tensor:
    """DivPrune's greedy Max-Min diversity selection (Alvar et al., CVPR'25; ALGORITHMS.md §3).

    With d(i, j) = 1 - cos(v_i, v_j) in fp32:

    - step 0 picks the most isolated token, argmax_j min_{i valid, i != j} d(i, j) (the reference takes
      the second-smallest entry of each distance column, the smallest being the token itself);
    - step t picks argmax_j min_{s in S} d(j, s) over the valid tokens not yet in S.

    Ties go to the lowest index (``argmax``'s first maximum, ONNX ``ArgMax`` with select_last_index=0).
    When k exceeds the valid tokens, padding slots follow in ascending position. The loop is unrolled
    over the static ``k`` (no data-dependent control flow; exports without ONNX Loop).

    Args:
        x: (B, N, D) projector features of one group, any float dtype.
        valid: (B, N) bool mask of real tokens.
        k: static budget, 1 <= k <= N.

    Returns:
        (B, k) int64 token indices in pick order (not sorted).
    """
    return _greedy_steps(x, valid, k, None)[0]


def divprune_margin(x: Tensor, valid: Tensor, k: int, target: Tensor) -> Tensor:
    """Tie margin (``ties``) of keeping ``target`` (B, k): the greedy steps replayed, each taking the best
    candidate inside ``target``; (B,) float64, the worst step's margin (0 for DivPrune's own set)."""
    if k == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    return _greedy_steps(x, valid, k, as_mask(target, x.shape[1]))[1]


def _greedy_steps(x: Tensor, valid: Tensor, k: int, prefer: Tensor | None) -> tuple[Tensor, Tensor]:
    """``divprune_order``'s picks, or with ``prefer`` (B, N) bool the picks that follow it, and the worst
    step margin."""
    dist = cosine_distance(x)  # (B, N, N)
    pos = torch.arange(dist.shape[-1], device=x.device)
    fallback = torch.where(valid, 0.0, pad_scores(valid))  # pads below every distance (>= -eps)
    crit, taken = isolation(dist, valid), torch.zeros_like(valid)
    picks, worst = [], torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    # every step's margin is relative to the group's largest distance: late steps choose among duplicates
    pairs = valid.unsqueeze(-1) & valid.unsqueeze(-2)
    scale = None if prefer is None else torch.where(pairs, dist, 0.0).flatten(1).amax(dim=-1)  # (B,)
    for _ in range(k):
        if prefer is None:
            score = torch.where(taken, float("-inf"), torch.where(valid, crit, fallback))
            pick = score.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            pick, margin = follow_topk(torch.where(valid, crit, fallback), 1, prefer, ~taken, scale)
            worst = torch.maximum(worst, margin)
        picks.append(pick)
        row = dist.gather(1, pick.unsqueeze(-1).expand(-1, 1, dist.shape[-1])).squeeze(1)  # (B, N) d(pick, .)
        crit = row if len(picks) == 1 else torch.minimum(crit, row)
        taken = taken | (pos == pick)
    return torch.cat(picks, dim=-1), worst  # (B, k), (B,)


def divprune_scores(x: Tensor, valid: Tensor, k: int) -> Tensor:
    """DivPrune as scores: the token picked at step t scores k - t (>= 1), every other token 0.

    Args:
        x: (B, N, D) projector features of one group.
        valid: (B, N) bool mask of real tokens.
        k: static budget.

    Returns:
        (B, N) fp32; its top-k is ``divprune_order``'s set.
    """
    if k == 0:  # a group whose share of an integer budget rounds to nothing
        return torch.zeros(valid.shape, device=x.device)
    order = divprune_order(x, valid, k)  # (B, k)
    steps = torch.arange(k, 0, -1, device=x.device, dtype=torch.float32).expand(order.shape)
    return torch.zeros(valid.shape, device=x.device).scatter(1, order, steps)
