"""G-Prune (Jiang et al., AAAI 2025): visual tokens as graph nodes, information propagated over
cosine-similarity edges, the tokens holding the most mass per neighbour kept.

Faithful to ../shared/docs/ALGORITHMS.md §1 (the authors' code): threshold theta, temperature tau,
masked row softmax, L2-norm initial scores, T mat-vec propagation steps (not ``matrix_power``),
division by degree. Graph math runs in fp32 whatever the input dtype. Pure tensor functions: no I/O,
no model-library imports; static shapes for a static ``k``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Masked logits: any value whose exp underflows to exactly 0 after the softmax's max subtraction
# (logits are in [-1/tau, 1/tau]); finite so fp16 exports stay NaN-free. The reference uses -5000.
_MASKED_LOGIT = -1.0e4


def transition(u: Tensor, theta: float, tau: float, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Row-stochastic transition matrix and edge mask of the similarity graph.

    Args:
        u: (B, N, D) fp32 unit-normalised token features.
        theta: cosine threshold; edges with cosine < theta are dropped.
        tau: softmax temperature.
        valid: optional (B, N) bool; invalid (padding) tokens get no edges except a self-loop.

    Returns:
        P: (B, N, N) transition matrix, rows sum to 1.
        M: (B, N, N) bool edge mask, symmetric, self-loops always present.
    """
    sim = u @ u.transpose(-1, -2)  # (B, N, N) cosines
    eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    mask = (sim >= theta) | eye  # self-loops kept even for zero vectors (cosine 0)
    if valid is not None:
        pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)  # (B, N, N)
        mask = (mask & pair) | eye  # pads keep a self-loop so no softmax row is empty
    logits = torch.where(mask, sim / tau, torch.full_like(sim, _MASKED_LOGIT))
    return logits.softmax(dim=-1), mask


def propagate(s0: Tensor, P: Tensor, iters: int) -> Tensor:
    """T steps of s <- s P (row vector times matrix): (B, N), (B, N, N) -> (B, N). Mass is conserved."""
    s = s0
    for _ in range(iters):
        s = (s.unsqueeze(-2) @ P).squeeze(-2)  # (B, 1, N) @ (B, N, N) -> (B, N)
    return s


def scores(
    x: Tensor,
    theta: float = 0.5,
    tau: float = 0.03,
    iters: int = 5,
    degree: str = "mask",
    valid: Tensor | None = None,
) -> Tensor:
    """G-Prune importance of each token of one group.

    Args:
        x: (B, N, D) projector features of one group (any float dtype).
        theta, tau, iters: graph threshold, temperature and propagation steps (ALGORITHMS.md §1.6).
        degree: ``mask`` = neighbour count in fp32; ``nonzero`` = count of ``P > 0`` with ``P`` computed
            in ``x``'s dtype, as the reference code does under fp16.
        valid: optional (B, N) bool mask of real tokens; invalid ones score -inf.

    Returns:
        (B, N) fp32 scores: propagated mass divided by degree. Higher is more important.
    """
    v = x.float()
    norm = v.norm(dim=-1)  # (B, N) initial scores s0 = ||v||
    u = v / norm.clamp_min(torch.finfo(v.dtype).tiny).unsqueeze(-1)
    P, mask = transition(u, theta, tau, valid)
    deg = _degree(u, mask, theta, tau, valid, x.dtype) if degree == "nonzero" else mask.sum(dim=-2)
    s0 = norm if valid is None else norm * valid
    score = propagate(s0, P, iters) / deg.to(P.dtype)
    if valid is not None:
        score = score.masked_fill(~valid, float("-inf"))
    return score


def _degree(u: Tensor, mask: Tensor, theta: float, tau: float, valid: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Reference-faithful degree: ``sum(P > 0, dim=1)`` with P evaluated in the model dtype."""
    if dtype == torch.float32:
        return mask.sum(dim=-2)
    P_low, _ = transition(u.to(dtype), theta, tau, valid)
    return (P_low > 0).sum(dim=-1)
