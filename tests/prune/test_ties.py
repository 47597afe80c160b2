"""The tie margin: another backend's kept set passes only where the reference's own decision values are
nearly tied. Every case builds its ties by construction, so nothing here depends on a CPU's rounding."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vtprune.config import PruneConfig
from vtprune.prune import VisualLayout, selector, tie_margins
from vtprune.prune.ties import FP32_MARGIN, exact_margin, follow_topk, inversion, topk_margin


def _idx(*xs: int) -> torch.Tensor:
    return torch.tensor([list(xs)])


def test_inversion_is_zero_for_the_top_set_and_relative_to_the_score_range():
    s = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    assert topk_margin(s, _idx(0, 1)).item() == 0.0
    assert topk_margin(s, _idx(1, 0)).item() == 0.0  # order does not matter
    assert topk_margin(s, _idx(0, 2)).item() == pytest.approx(1 / 4)  # 4 left out above 3 kept, range 4
    assert topk_margin(s, _idx(0, 4)).item() == pytest.approx(3 / 4)
    for scaled in (s * 1e6, s * 1e-6 + 7.0):  # the same decision at another scale or offset
        assert topk_margin(scaled, _idx(0, 2)).item() == pytest.approx(1 / 4, rel=1e-6)


def test_inversion_ignores_non_candidates_and_non_finite_scores():
    s = torch.tensor([[3.0, 2.0, 1.0, -math.inf]])
    candidates = torch.tensor([[False, True, True, True]])
    chosen = torch.tensor([[False, True, False, False]])
    assert inversion(s, chosen, candidates).item() == 0.0  # token 0 was not on offer
    assert topk_margin(s, _idx(0, 1, 2)).item() == 0.0


def test_a_near_tie_flip_is_within_the_margin_and_a_clear_swap_is_not():
    torch.manual_seed(0)
    s = torch.rand(1, 64)
    order = s[0].argsort(descending=True)
    k = 16
    s[0, order[k]] = s[0, order[k - 1]] - 1e-7  # the first token left out sits just below the cut
    own = order[:k]
    flipped = torch.cat([order[: k - 1], order[k : k + 1]])  # the near-tied pair traded places
    far = torch.cat([order[: k - 1], order[-1:]])  # the lowest-scoring token kept instead
    assert topk_margin(s, own[None]).item() == 0.0
    assert 0 < topk_margin(s, flipped[None]).item() < FP32_MARGIN
    assert topk_margin(s, far[None]).item() > 0.1


def test_exact_methods_refuse_any_other_set():
    assert exact_margin(_idx(1, 3), _idx(3, 1)).item() == 0.0
    assert exact_margin(_idx(1, 3), _idx(1, 2)).item() == math.inf


@pytest.mark.parametrize("method", ["random", "uniform"])
def test_integer_methods_have_no_ties(method):
    cfg = PruneConfig(method=method, keep=4)
    x, valid = torch.randn(1, 16, 8), torch.ones(1, 16, dtype=torch.bool)
    own = selector(method)(x, valid, 4, cfg)
    assert selector(method).tie_margin(x, valid, 4, cfg, own).item() == 0.0
    other = own.clone()
    other[0, 0] = next(i for i in range(16) if i not in own[0].tolist())
    assert selector(method).tie_margin(x, valid, 4, cfg, other).item() == math.inf


def test_gprune_exact_duplicates_are_ties_and_a_clear_swap_is_not():
    torch.manual_seed(1)
    x = torch.randn(1, 12, 16)
    x[0, 1] = x[0, 0]  # tokens 0 and 1 are twins: equal scores
    valid = torch.ones(1, 12, dtype=torch.bool)
    cfg = PruneConfig(method="gprune", keep=4)
    scores = selector("gprune").scores(x, valid, 4, cfg)[0]
    assert scores[0] == scores[1]
    k = int((scores > scores[0]).sum()) + 1  # the cut falls between the twins
    own = selector("gprune")(x, valid, k, cfg)
    kept = set(own[0].tolist())
    assert len(kept & {0, 1}) == 1
    swapped = torch.tensor([sorted(kept ^ {0, 1})])
    assert selector("gprune").tie_margin(x, valid, k, cfg, swapped).item() == 0.0
    weakest, strongest = scores.argmin().item(), scores.argmax().item()
    if k > 1:  # the strongest token left out for the weakest one
        clear = torch.tensor([sorted((kept - {strongest}) | {weakest})])
        assert selector("gprune").tie_margin(x, valid, k, cfg, clear).item() > 0.5


def test_divprune_replays_its_greedy_steps_towards_the_other_set():
    cfg = PruneConfig(method="divprune", keep=3)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]]])  # tokens 1 and 2 are twins
    valid = torch.ones(1, 5, dtype=torch.bool)
    own = selector("divprune")(x, valid, 3, cfg)
    assert selector("divprune").tie_margin(x, valid, 3, cfg, own).item() == 0.0
    twin = own.clone()
    twin[own == 1], twin[own == 2] = 2, 1  # the other twin: same distances, a tie at its step
    assert set(own[0].tolist()) & {1, 2} and selector("divprune").tie_margin(x, valid, 3, cfg, twin).item() == 0.0
    worst = torch.tensor([[0, 3, 4] if 3 not in own[0].tolist() else [0, 1, 3]])
    assert selector("divprune").tie_margin(x, valid, 3, cfg, worst).item() > FP32_MARGIN


def _evidence(attn: list[float]) -> torch.Tensor:
    """VisionZip evidence: CLS attention plus orthogonal keys."""
    n = len(attn)
    return torch.cat([torch.tensor(attn)[None, :, None], torch.eye(n)[None]], dim=-1)


def test_visionzip_dominant_near_ties_pass_and_a_broken_contextual_set_does_not():
    cfg = PruneConfig(method="visionzip", keep=4)  # 3 dominant + 1 contextual, strided over the rest
    attn = [0.9, 0.8, 0.700001, 0.1, 0.05, 0.7, 0.02, 0.01]  # tokens 2 and 5 near-tie for the last dominant place
    ev, valid = _evidence(attn), torch.ones(1, 8, dtype=torch.bool)
    zip_ = selector("visionzip")
    own = zip_(ev, valid, 4, cfg)
    assert own[0].tolist() == [0, 1, 2, 3]  # dominant 0, 1, 2; the rest's first token 3 is the contextual target
    assert zip_.tie_margin(ev, valid, 4, cfg, own).item() == 0.0
    flipped = torch.tensor([[0, 1, 2, 5]])  # 5 dominant in 2's place: 2 then heads the rest as contextual target
    assert 0 < zip_.tie_margin(ev, valid, 4, cfg, flipped).item() < FP32_MARGIN
    broken = torch.tensor([[0, 1, 5, 6]])  # 5 dominant, but 6 is not the strided target of the rest
    assert zip_.tie_margin(ev, valid, 4, cfg, broken).item() == math.inf
    far = torch.tensor([[0, 1, 3, 7]])  # 7 (attention 0.01) dominant: explained only far from the cut
    assert zip_.tie_margin(ev, valid, 4, cfg, far).item() > FP32_MARGIN


def test_visionzip_merge_follows_the_dominant_set_a_kept_set_implies():
    from vtprune.prune import visionzip

    attn = [0.9, 0.8, 0.700001, 0.1, 0.05, 0.7, 0.02, 0.01]
    ev, valid = _evidence(attn), torch.ones(1, 8, dtype=torch.bool)
    x = torch.arange(8.0)[None, :, None]
    own = visionzip.merge(x, ev, valid, 4)
    followed = visionzip.merge(x, ev, valid, 4, torch.tensor([[0, 1, 2, 5]]))
    assert own[0, 2, 0] == 2.0 and own[0, 3, 0] != 3.0  # token 3 is the merged contextual token
    assert followed[0, 2, 0] != 2.0 and followed[0, 5, 0] == 5.0  # now 2 is merged and 5 is dominant


def test_follow_topk_prefers_the_other_set_and_reports_its_margin():
    v = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    every = torch.ones(1, 4, dtype=torch.bool)
    picks, tie = follow_topk(v, 2, torch.tensor([[True, False, True, False]]), every)
    assert sorted(picks[0].tolist()) == [0, 2] and tie.item() == pytest.approx(1 / 3)
    picks, tie = follow_topk(v, 2, torch.tensor([[False, False, False, True]]), every)  # too few preferred
    assert sorted(picks[0].tolist()) == [0, 3]


def test_tie_margins_per_group_and_structural_mismatches_are_infinite():
    layout = VisualLayout(8, (torch.arange(0, 4), torch.arange(4, 8)), torch.empty(0, dtype=torch.long), ("a", "b"))
    cfg = PruneConfig(method="gprune", keep=4)
    x = torch.randn(1, 8, 6)
    from vtprune.prune import select_visual

    own = select_visual(x, layout, cfg)
    assert tie_margins(x, layout, cfg, own) == [0.0, 0.0]
    lopsided = torch.tensor([[0, 1, 2, 4]])  # 3 + 1 instead of 2 + 2
    assert tie_margins(x, layout, cfg, lopsided) == [math.inf, math.inf]
    assert tie_margins(x, layout, dataclasses.replace(cfg, method="none", keep=None), torch.arange(8)[None]) == [0.0]
