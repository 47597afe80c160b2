"""Budgets, group-wise selection, sort order and always-kept tokens."""

from __future__ import annotations

import pytest
import torch

from vtprune.config import PruneConfig
from vtprune.errors import BudgetError
from vtprune.prune import VisualLayout, group_budgets, select_visual
from vtprune.prune.select import gather_positions, gather_tokens, keep_topk


def test_keep_topk_is_sorted_ascending():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.8, 0.2]])
    assert keep_topk(s, 3).tolist() == [[1, 2, 3]]


def test_gathers():
    x = torch.arange(24.0).view(1, 6, 4)
    idx = torch.tensor([[1, 4]])
    assert gather_tokens(x, idx)[0, :, 0].tolist() == [4.0, 16.0]
    pos3 = torch.arange(6).expand(3, 1, 6) * torch.tensor([1, 10, 100]).view(3, 1, 1)
    assert gather_positions(pos3, idx)[:, 0].tolist() == [[1, 4], [10, 40], [100, 400]]


@pytest.mark.parametrize(
    ("sizes", "keep", "expected"),
    [([576, 1728], 64, [16, 48]), ([10, 20, 30], 7, [1, 2, 4]), ([576], 576, [576]),
     ([576, 1000], 0.5, [288, 500]), ([3, 5], 0.1, [1, 1]), ([576, 1000], 1.0, [576, 1000])],
)  # fmt: skip
def test_group_budgets(sizes, keep, expected):
    out = group_budgets(sizes, keep)
    assert out == expected
    if isinstance(keep, int):
        assert sum(out) == keep


def test_budget_larger_than_tokens_is_an_error():
    with pytest.raises(BudgetError, match="larger than the 30 prunable"):
        group_budgets([10, 20], 31)


def test_int_budget_split_follows_capacities_and_clamps():
    assert group_budgets([16, 20], 40, capacities=[16, 64]) == [8, 20]  # 40 * 16/80 = 8, 32 clamped to 20
    assert group_budgets([16, 64], 40, capacities=[16, 64]) == [8, 32]
    with pytest.raises(BudgetError, match="larger than the 80"):
        group_budgets([16, 20], 81, capacities=[16, 64])


def _next_like_layout() -> VisualLayout:
    """base 0..7, then a 2x3 high-res grid with a newline after each row: 8 9 10 [11] 12 13 14 [15]."""
    hr = torch.tensor([8, 9, 10, 12, 13, 14])
    return VisualLayout(16, (torch.arange(8), hr), torch.tensor([11, 15]), ("base", "hr"))


def test_per_group_budgets_and_newlines_kept():
    layout = _next_like_layout()
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
    idx = select_visual(x, layout, PruneConfig(method="gprune", keep=7))  # split 4 base + 3 hr (8:6)
    kept = idx[0].tolist()
    assert kept == sorted(kept)
    assert {11, 15} <= set(kept)
    assert sum(i < 8 for i in kept) == 4
    assert sum(i in {8, 9, 10, 12, 13, 14} for i in kept) == 3
    assert len(kept) == 7 + 2


def test_ratio_budget_applies_per_group():
    layout = _next_like_layout()
    x = torch.randn(1, 16, 8)
    kept = select_visual(x, layout, PruneConfig(method="gprune", keep=0.5))[0].tolist()
    assert sum(i < 8 for i in kept) == 4 and len(kept) == 4 + 3 + 2


def test_method_none_keeps_everything():
    layout = _next_like_layout()
    assert select_visual(torch.randn(2, 16, 8), layout, PruneConfig()).tolist() == [list(range(16))] * 2


def test_full_keep_keeps_everything():
    layout = _next_like_layout()
    kept = select_visual(torch.randn(1, 16, 8), layout, PruneConfig(method="gprune", keep=14))
    assert kept[0].tolist() == list(range(16))
