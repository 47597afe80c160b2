"""VisionZip (Yang et al., CVPR'25; ALGORITHMS.md §3): dominant and contextual tokens inside the vision
encoder, at the feature layer, before the projector.

- **Dominant tokens**: the ``d`` patches the [CLS] token attends to most at the feature layer, its
  softmax row summed over heads (``cls_attention``, recomputed from the layer's own q/k projections by
  the model adapter, so the tower keeps its fused attention).
- **Contextual tokens**: the other patches, in raster order, provide ``c`` uniformly strided *targets*
  (ranks 0, s, 2s, ... with s = max(1, (n - d) // c), as the reference code); every remaining patch
  joins the target whose key (head-averaged, at the feature layer) is most cosine-similar, and each
  group (target included) is averaged into one contextual token that takes the target's place.

The kept set is dominant + targets, so a contextual token sits at its target's original position.
The method is split in two pure steps over one group of tokens: ``scores`` (budget-aware, whose top-k
is the kept set, like every pre-LLM selector) and ``merge`` (features with each target replaced by its
group mean). Both read an *evidence* tensor that packs what the encoder provides per patch:

    evidence[..., 0]  = CLS attention (B, N), summed over heads
    evidence[..., 1:] = head-averaged keys (B, N, hd)

Padding slots (``valid`` False) are never dominant, targets or members; valid tokens are addressed by
rank, so a padded group chooses what the same group without padding chooses. Exportable as is: static
``d`` and ``c``, TopK/gather/one-hot matmuls, no boolean indexing, no ``.item()``.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from vtprune.prune.baselines import pad_scores
from vtprune.prune.ties import as_mask, exact_margin, follow_topk, inversion

# The paper's splits (54+10 of 64, 108+20 of 128, 162+30 of 192) are all dominant = K * 27/32.
DOMINANT_SHARE = 27 / 32


def split_budget(k: int) -> tuple[int, int]:
    """(dominant, contextual) tokens of a budget ``k``: d = round(k * 27/32) (halves up), at most k - 1
    so that every k >= 2 keeps at least one contextual token; k <= 1 is dominant only.

    64 -> (54, 10), 128 -> (108, 20), 192 -> (162, 30), 16 -> (14, 2), 2 -> (1, 1).
    """
    if k <= 1:
        return k, 0
    dominant = min(k - 1, int(k * DOMINANT_SHARE + 0.5))
    return dominant, k - dominant


def cls_attention(q_cls: Tensor, keys: Tensor, scale: float) -> Tensor:
    """The [CLS] token's attention row, summed over heads.

    Args:
        q_cls: (B, H, hd) query of the CLS token at the feature layer.
        keys: (B, H, T, hd) keys of every token of that layer (CLS included).
        scale: the layer's logit scale (hd ** -0.5).

    Returns:
        (B, T) fp32: sum over heads of softmax(q k^T * scale), each head's row summing to 1.
    """
    logits = (q_cls.float().unsqueeze(-2) @ keys.float().transpose(-1, -2)).squeeze(-2) * scale  # (B, H, T)
    return logits.softmax(dim=-1).sum(dim=1)


def evidence(cls_attn: Tensor, keys: Tensor) -> Tensor:
    """Pack per-patch evidence: (B, N) CLS attention, (B, H, N, hd) keys -> (B, N, 1 + hd) fp32."""
    return torch.cat([cls_attn.float().unsqueeze(-1), keys.float().mean(dim=1)], dim=-1)


def _rank(mask: Tensor) -> Tensor:
    """Rank of each True entry among the True ones, raster order: (B, N) bool -> (B, N) int64."""
    return (mask.float().cumsum(dim=-1) - 1.0).clamp_min(0.0).long()  # float cumsum: exact below 2**24


def _roles(ev: Tensor, valid: Tensor, k: int, top: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dominant, target, member, slot), each (B, N): who is kept, who is merged, and each target's
    contextual slot in [0, c). A group of n <= k valid tokens keeps all of them unmerged. ``top`` (B, d)
    imposes the dominant tokens (``follow``)."""
    d, c = split_budget(k)
    n = valid.long().sum(dim=-1, keepdim=True)  # (B, 1)
    fits = n <= k  # (B, 1): the budget covers the group
    if top is None:
        top = torch.where(valid, ev[..., 0], float("-inf")).topk(d, dim=-1).indices  # (B, d)
    dominant = (torch.zeros(valid.shape, device=valid.device).scatter(1, top, 1.0) > 0) & valid
    rest = valid & ~dominant
    if c == 0:
        zeros = torch.zeros_like(valid)
        return dominant | (fits & valid), zeros, zeros, torch.zeros_like(n).expand_as(valid)
    rank, step = _rank(rest), ((n - d) // c).clamp_min(1)  # (B, N), (B, 1)
    target = rest & (rank % step == 0) & (rank < c * step) & ~fits
    member = rest & ~target & ~fits
    return dominant | (fits & valid), target, member, (rank // step).clamp_max(c - 1)


def scores(ev: Tensor, valid: Tensor, k: int) -> Tensor:
    """Budget-aware VisionZip scores: 1 for the dominant and target tokens, 0 for other valid tokens,
    ``pad_scores`` for padding, so the top-k is exactly the kept set (strict gap, no ties at the cut).

    Args:
        ev: (B, N, 1 + hd) evidence (see module docstring).
        valid: (B, N) bool mask of real tokens.
        k: static budget, ``split_budget(k)`` dominant + contextual.

    Returns:
        (B, N) fp32.
    """
    if k == 0:  # a group whose share of an integer budget rounds to nothing
        return torch.where(valid, 0.0, pad_scores(valid))
    if k >= valid.shape[-1]:  # static: the budget covers every slot
        return torch.where(valid, 1.0, pad_scores(valid))
    dominant, target, _, _ = _roles(ev, valid, k)
    return torch.where(dominant | target, 1.0, torch.where(valid, 0.0, pad_scores(valid)))


def assign(ev: Tensor, target: Tensor, slot: Tensor, c: int) -> Tensor:
    """Contextual slot of every token: the target with the most cosine-similar key (first on ties).

    Args:
        ev: (B, N, 1 + hd) evidence.
        target: (B, N) bool, exactly ``c`` True per row (or none, when the budget covers the group).
        slot: (B, N) int64, each target's slot.
        c: static number of contextual tokens.

    Returns:
        (B, N) int64 in [0, c).
    """
    keys = ev[..., 1:]
    unit = keys / keys.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # (B, N, hd)
    # the c targets in slot order (largest -slot first), so cosine column s belongs to slot s's target
    order = torch.where(target, -slot.float(), float("-inf")).topk(c, dim=-1).indices  # (B, c)
    t_unit = unit.gather(1, order.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))  # (B, c, hd)
    return (unit @ t_unit.transpose(-1, -2)).argmax(dim=-1)  # (B, N) cosine to each target


def merge(x: Tensor, ev: Tensor, valid: Tensor, k: int, follow: Tensor | None = None) -> Tensor:
    """Features with every target replaced by the mean of its group (the target and the tokens assigned
    to it); dominant and dropped tokens unchanged. Gathering the ``scores`` top-k of the result gives
    the VisionZip tokens in raster order.

    Args:
        x: (B, N, C) features at the feature layer (before the projector).
        ev: (B, N, 1 + hd) evidence.
        valid: (B, N) bool.
        k: static budget.
        follow: optional (B, k) kept indices of another backend; the merge then uses the dominant tokens
            that set implies (``follow_dominant``).

    Returns:
        (B, N, C) in x's dtype; the means are computed in fp32.
    """
    _, c = split_budget(k)
    if c == 0 or k >= x.shape[1]:  # static: nothing is merged
        return x
    top = None if follow is None else follow_dominant(ev, valid, k, follow)[0]
    _, target, member, slot = _roles(ev, valid, k, top)
    group = torch.where(target, slot, assign(ev, target, slot, c))  # (B, N) slot of each token
    slots = torch.arange(c, device=x.device)
    onehot = ((group.unsqueeze(-1) == slots) & (target | member).unsqueeze(-1)).float()  # (B, N, c)
    sums = onehot.transpose(-1, -2) @ x.float()  # (B, c, C)
    means = sums / onehot.sum(dim=1).clamp_min(1.0).unsqueeze(-1)  # (B, c, C)
    at_target = means.gather(1, slot.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, N, C)
    return torch.where(target.unsqueeze(-1), at_target.to(x.dtype), x)


AMBIGUOUS = 1e-2  # of the attention range: wider than any margin a bundle may show (``ties.FP16_MARGIN``)
MAX_TRIES = 4096


def margin(ev: Tensor, valid: Tensor, k: int, target: Tensor) -> Tensor:
    """Tie margin (``ties``) of keeping ``target`` (B, k): the smallest CLS-attention margin of a dominant set
    inside ``target`` whose strided contextual targets are the rest of it; +inf when there is none.

    Returns:
        (B,) float64.
    """
    if k == 0 or k >= valid.shape[-1]:  # static: nothing to choose
        return exact_margin(scores(ev, valid, k).topk(k, dim=-1).indices, target)
    return follow_dominant(ev, valid, k, target)[1]


def follow_dominant(ev: Tensor, valid: Tensor, k: int, target: Tensor) -> tuple[Tensor, Tensor]:
    """(B, d) the dominant tokens that explain each kept set ``target`` (B, k) with the smallest margin, and
    (B,) that margin; where no dominant set does, the set's d highest CLS-attention tokens and +inf."""
    found = [_dominant_one(ev[b : b + 1], valid[b : b + 1], k, target[b : b + 1]) for b in range(ev.shape[0])]
    return torch.cat([top for top, _ in found]), torch.stack([tie for _, tie in found])


def _dominant_one(ev: Tensor, valid: Tensor, k: int, target: Tensor) -> tuple[Tensor, Tensor]:
    """``follow_dominant`` for batch 1.

    Tokens of ``target`` far above the reference's dominant cut are dominant, far below it contextual; the
    few within ``AMBIGUOUS`` of the attention range around the cut are tried both ways (``MAX_TRIES`` sets).
    """
    d, _ = split_budget(k)
    attn = torch.where(valid, ev[..., 0], float("-inf")).double()[0]  # (N,)
    finite = attn[valid[0]]
    window = AMBIGUOUS * float(finite.max() - finite.min())
    cut = float(attn.topk(d).values[-1])
    in_target = as_mask(target, ev.shape[1])  # (1, N)
    sure = in_target[0] & (attn > cut + window)
    maybe = (in_target[0] & ~sure & (attn >= cut - window)).nonzero().squeeze(-1).tolist()
    best, best_top = torch.tensor(torch.inf, dtype=torch.float64), None
    for extra in itertools.islice(itertools.combinations(maybe, max(0, d - int(sure.sum()))), MAX_TRIES):
        dominant = sure.clone()
        dominant[list(extra)] = True
        top = dominant.nonzero().squeeze(-1)[None]  # (1, d)
        kept, targets, _, _ = _roles(ev, valid, k, top)
        tie = inversion(ev[..., 0], dominant[None], valid)[0]
        if top.shape[-1] == d and torch.equal(kept | targets, in_target) and tie < best:
            best, best_top = tie, top
    if best_top is None:  # nothing explains it (margin +inf fails the check); merge around its top d anyway
        best_top = follow_topk(ev[..., 0], d, in_target, valid)[0]
    return best_top, best
