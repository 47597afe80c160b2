"""How far a kept set is from a method's own choice: the tie margin that judges exports on any CPU.

Two correct implementations of a selection (PyTorch's BLAS, ONNX Runtime's MLAS, a CPU with AVX2 or one
with AVX-512) compute its scores with different last bits. Where two tokens score almost alike, those
bits decide which one is kept. So another backend's kept set is judged by its *margin*: the smallest
perturbation of the reference's decision values, relative to their range, under which the reference
itself would choose that set. For a top-k of scores s over candidates C with chosen set S it is

    inversion(S) = max(0, max_{j in C - S} s_j - min_{i in S} s_i) / (max_C s - min_C s)

(0 for the reference's own set; a token swapped from far below the cut scores a large margin). Methods
made of several decisions (DivPrune's greedy steps, VisionZip's dominant tokens, DART's pivots and
claims) replay their decisions towards the other set and report the worst one (see each method).

Pure tensor functions: no I/O, no model-library imports.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# fp32 graphs: ONNX Runtime vs PyTorch on real pocket features, with PyTorch's AVX-512 and AVX2 kernels, kept
# sets differ on up to 100% of images but by at most 1.3e-5 (DivPrune) and 5.6e-6 (G-Prune) of the score
# range (benchmarks/results/ties/); a token swapped beyond 1e-4 fails.
FP32_MARGIN = 1e-4
# fp16 graphs: the fp16 rounding of features and attention reorders more (pocket on easy-vqa, K=64: IoU
# down to 0.71, every swapped token close to the cut).
FP16_MARGIN = 1e-2


# int8 / int4 weights: the routed layers' selectors score hidden states the quantized layers computed, so a
# quantized bundle legitimately chooses other tokens (pocket, ALVTS k=28 from layer 12: margins up to 0.045
# with int8 in blocks of 128, above 0.1 with int4). Their margins are reported, not gated: the reference
# follows those choices and the logits' KL divergence judges the result.
QUANT_MARGIN: dict[str, float | None] = {"int8": None, "int4": None, "w8a8": None, "vision-int8": None}


def margin_limit(precision: str) -> float | None:
    """The largest tie margin a graph computed in ``precision`` (fp32, fp16, or int8 / int4 weights) may
    show against the fp32 reference; None where margins are reported, not gated."""
    return {"fp32": FP32_MARGIN, "fp16": FP16_MARGIN, **QUANT_MARGIN}[precision]


def inversion(values: Tensor, chosen: Tensor, candidates: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    """Relative margin by which ``chosen`` fails to be the top of ``values`` among ``candidates``.

    Args:
        values: (B, N) decision values (higher is chosen first); non-finite entries are never candidates.
        chosen: (B, N) bool, the set whose margin is measured (a subset of the candidates).
        candidates: (B, N) bool, the tokens the decision chose among (default: every finite entry).
        scale: (B,) the values' scale (default: their range over the candidates). A decision late in a
            greedy sequence can be among candidates whose spread is itself rounding noise (duplicate
            tokens), so sequences pass the scale of the whole decision.

    Returns:
        (B,) float64 >= 0; 0 when ``chosen`` is a top-|chosen| of ``values``.
    """
    v = values.double()
    cand = torch.isfinite(v) if candidates is None else candidates & torch.isfinite(v)
    if scale is None:
        scale = value_range(v, cand)
    scale = scale.double().clamp_min(1e-300)
    worst_kept = torch.where(chosen & cand, v, math.inf).amin(dim=-1)
    best_left = torch.where(cand & ~chosen, v, -math.inf).amax(dim=-1)
    gap = (best_left - worst_kept).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    return (gap / scale).clamp_min(0.0)


def value_range(values: Tensor, candidates: Tensor) -> Tensor:
    """(B,) max - min of ``values`` (B, N) over ``candidates`` (B, N) bool (finite entries only)."""
    v = values.double()
    ok = candidates & torch.isfinite(v)
    return torch.where(ok, v, -math.inf).amax(dim=-1) - torch.where(ok, v, math.inf).amin(dim=-1)


def topk_margin(scores: Tensor, target: Tensor) -> Tensor:
    """Margin of keeping ``target`` for a method whose kept set is the top-k of ``scores``.

    Args:
        scores: (B, N) scores.
        target: (B, k) int64 indices of the set to judge.

    Returns:
        (B,) float64.
    """
    return inversion(scores, as_mask(target, scores.shape[-1]))


def exact_margin(chosen: Tensor, target: Tensor) -> Tensor:
    """Margin of a method with no near-ties by construction (integer arithmetic): 0 for its own set,
    +inf for any other. ``chosen``, ``target``: (B, k) indices."""
    same = (chosen.sort(dim=-1).values == target.sort(dim=-1).values).all(dim=-1)
    return torch.where(same, 0.0, math.inf).double()


def as_mask(idx: Tensor, n: int) -> Tensor:
    """(B, k) indices -> (B, n) bool membership."""
    return torch.zeros(*idx.shape[:-1], n, dtype=torch.bool, device=idx.device).scatter(-1, idx, True)


def follow_topk(
    values: Tensor, m: int, prefer: Tensor, candidates: Tensor, scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One top-``m`` decision replayed towards ``prefer``: the ``m`` best candidates in ``prefer``
    (then the best others, when ``prefer`` holds fewer), and the margin that choice needs.

    Args:
        values: (B, N) decision values; prefer, candidates: (B, N) bool; scale: as for ``inversion``.

    Returns:
        (B, m) int64 chosen indices, (B,) float64 margin.
    """
    v = values.double()
    ok = candidates & torch.isfinite(v)
    lift = (torch.where(ok, v.abs(), 0.0).amax(dim=-1, keepdim=True) + 1) * 4  # preferred rank above the rest
    order = torch.where(ok, v + lift * (prefer & ok), -math.inf)
    picks = order.topk(m, dim=-1).indices
    return picks, inversion(values, as_mask(picks, values.shape[-1]), candidates, scale)
