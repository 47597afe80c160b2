"""Pre-LLM baselines (random, uniform, DivPrune) on hand-built inputs with known answers, and the
properties every registered pre-LLM selector must have (ascending unique indices, padding last)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from vtprune import methods
from vtprune.config import PruneConfig
from vtprune.errors import ConfigError
from vtprune.prune import VisualLayout, baselines, select_visual, selector

PRE_LLM = methods.names(("pre", "encoder"))
# Selectors that score any (padded) group; grid methods (pool) read the group's token grid instead: they are
# tested in their own file, and the padded groups below occur only in LLaVA-NeXT's export graph, which
# refuses them.
PADDED = [m for m in PRE_LLM if not selector(m).grid]


def _select(method: str, x: torch.Tensor, valid: torch.Tensor, k: int, **cfg) -> list[list[int]]:
    return selector(method)(x, valid, k, PruneConfig(method=method, keep=k, **cfg)).tolist()


def _all_valid(b: int, n: int) -> torch.Tensor:
    return torch.ones(b, n, dtype=torch.bool)


# --- registry ------------------------------------------------------------------------------------
def test_every_registered_method_loads_its_implementation():
    for m in methods.all_methods():
        impl = m.load("router" if m.where == "in_llm" else "selector")
        assert callable(impl), m.name
        assert m.stage_macs is None or callable(m.load("stage_macs"))
        assert m.graph_scores is None or callable(m.load("graph_scores"))


@pytest.mark.parametrize("method", PRE_LLM)
def test_every_pre_llm_method_has_known_answer_tests(method: str):
    here = [name for name in dir(sys.modules[__name__]) if name.startswith(f"test_{method}_")]
    own_file = Path(__file__).with_name(f"test_{method}.py").is_file()  # e.g. test_gprune.py
    assert here or own_file, f"no known-answer test for {method!r}: add test_{method}_* here"


# --- properties of every selector ----------------------------------------------------------------
def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three images of 12 slots: all valid; 8 valid with padding interleaved; a valid prefix of 5."""
    x = torch.randn(3, 12, 6, generator=torch.Generator().manual_seed(1))
    valid = _all_valid(3, 12)
    valid[1, [1, 4, 5, 9]] = False
    valid[2, 5:] = False
    return x, valid


@pytest.mark.parametrize("method", PADDED)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_indices_are_ascending_unique_and_valid(method: str, k: int):
    x, valid = _padded_batch()
    idx = selector(method)(x, valid, k, PruneConfig(method=method, keep=k))
    assert idx.shape == (3, k) and idx.dtype == torch.int64
    for row, mask in zip(idx.tolist(), valid, strict=True):
        assert row == sorted(set(row))
        assert all(mask[i] for i in row), (row, mask)


@pytest.mark.parametrize("method", PADDED)
def test_padding_only_fills_a_budget_larger_than_the_valid_tokens(method: str):
    x, valid = _padded_batch()
    idx = selector(method)(x, valid, 9, PruneConfig(method=method, keep=9))
    for row, mask in zip(idx[1:].tolist(), valid[1:], strict=True):  # 8 and 5 valid tokens
        assert set(torch.nonzero(mask).squeeze(-1).tolist()) <= set(row)
    if method != "gprune":  # G-Prune scores every pad -inf; the baselines fill with the earliest pads
        assert idx[2].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("method", PADDED)
def test_a_group_with_no_budget_keeps_nothing(method: str):
    x, valid = _padded_batch()
    assert selector(method)(x, valid, 0, PruneConfig(method=method, keep=1)).shape == (3, 0)


@pytest.mark.parametrize("method", PADDED)
def test_batch_rows_are_independent(method: str):
    x, valid = _padded_batch()
    cfg = PruneConfig(method=method, keep=4)
    batch = selector(method)(x, valid, 4, cfg)
    for b in range(3):
        assert batch[b].tolist() == selector(method)(x[b : b + 1], valid[b : b + 1], 4, cfg)[0].tolist()


@pytest.mark.parametrize("method", [m for m in PADDED if m != "gprune"])
def test_padded_group_chooses_what_the_unpadded_group_chooses(method: str):
    """The exported graph sees padded groups, the eager pipeline unpadded ones: same choice."""
    x, valid = _padded_batch()
    for b in range(3):
        real = torch.nonzero(valid[b]).squeeze(-1)  # (n,) slot of each valid token
        compact = _select(method, x[b : b + 1, real], _all_valid(1, real.numel()), 4)[0]
        padded = _select(method, x[b : b + 1], valid[b : b + 1], 4)[0]
        assert padded == real[compact].tolist()


@pytest.mark.parametrize("method", PADDED)
def test_select_visual_keeps_newlines_and_per_group_budgets(method: str):
    hr = torch.tensor([8, 9, 10, 12, 13, 14])  # base 0..7, 2x3 high-res grid, newlines 11 and 15
    layout = VisualLayout(16, (torch.arange(8), hr), torch.tensor([11, 15]), ("base", "hr"))
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    kept = select_visual(x, layout, PruneConfig(method=method, keep=7)).tolist()  # 4 base + 3 hr
    for row in kept:
        assert row == sorted(row) and len(row) == 9 and {11, 15} <= set(row)
        assert sum(i < 8 for i in row) == 4 and sum(i in hr.tolist() for i in row) == 3


# --- random --------------------------------------------------------------------------------------
def test_random_is_reproducible_per_seed_and_changes_with_it():
    valid = _all_valid(1, 64)
    x = torch.zeros(1, 64, 4)
    a, b = _select("random", x, valid, 8, seed=3), _select("random", x, valid, 8, seed=3)
    assert a == b
    others = {tuple(_select("random", x, valid, 8, seed=s)[0]) for s in range(20)}
    assert len(others) == 20  # 20 seeds, 20 different draws of 8 of 64


def test_random_ignores_token_content():
    valid = _all_valid(1, 32)
    x1 = torch.randn(1, 32, 4, generator=torch.Generator().manual_seed(0))
    assert _select("random", x1, valid, 5, seed=9) == _select("random", x1 * 0 + 1, valid, 5, seed=9)


def test_random_covers_positions_uniformly():
    n, k, seeds = 16, 4, 2000
    counts = torch.zeros(n)
    for seed in range(seeds):
        counts[baselines.random_scores(_all_valid(1, n), seed).topk(k).indices] += 1
    expected, sd = seeds * k / n, math.sqrt(seeds * (k / n) * (1 - k / n))
    assert ((counts - expected).abs() < 5 * sd).all(), counts.tolist()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 45.0, chi2  # 15 dof: p < 1e-4 above this


def test_random_seed_is_validated():
    assert PruneConfig().seed == 0
    assert PruneConfig.from_dict(PruneConfig(method="random", keep=4, seed=7).to_dict()).seed == 7
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(ConfigError, match="seed"):
            PruneConfig(method="random", keep=4, seed=bad)


# --- uniform -------------------------------------------------------------------------------------
def _grid_set(rows: list[int], cols: list[int], side: int) -> list[int]:
    return sorted(r * side + c for r in rows for c in cols)


@pytest.mark.parametrize(
    ("side", "k", "lines"),
    [(16, 64, [1, 3, 5, 7, 9, 11, 13, 15]), (16, 16, [2, 6, 10, 14]), (24, 144, list(range(1, 24, 2))),
     (4, 4, [1, 3]), (16, 1, [8])],
)  # fmt: skip
def test_uniform_square_grid_gives_a_lattice(side: int, k: int, lines: list[int]):
    got = _select("uniform", torch.zeros(1, side * side, 2), _all_valid(1, side * side), k)[0]
    assert got == _grid_set(lines, lines, side)


def test_uniform_non_square_budget_spreads_rows_evenly():
    got = torch.tensor(_select("uniform", torch.zeros(1, 256, 2), _all_valid(1, 256), 32)[0])
    rows, cols = got // 16, got % 16
    assert sorted(set(rows.tolist())) == [1, 4, 8, 11, 14]  # a = max(isqrt(32), ceil(32/16)) = 5 rows
    assert [int((rows == r).sum()) for r in (1, 4, 8, 11, 14)] == [6, 6, 7, 6, 7]
    assert cols[rows == 8].tolist() == [1, 3, 5, 8, 10, 12, 14]  # floor((2j+1) * 16 / 14)


def test_uniform_budget_needing_full_rows_stays_exact():
    got = _select("uniform", torch.zeros(1, 16, 2), _all_valid(1, 16), 15)[0]  # 4 rows of 3, 4, 4, 4
    assert len(got) == 15 and [i for i in range(16) if i not in got] == [1]  # row 0: cols 0, 2, 3


def test_uniform_non_square_group_is_raster_strided():
    assert _select("uniform", torch.zeros(1, 10, 2), _all_valid(1, 10), 4) == [[1, 3, 6, 8]]
    assert _select("uniform", torch.zeros(1, 12, 2), _all_valid(1, 12), 3) == [[2, 6, 10]]


def test_uniform_counts_only_valid_tokens():
    valid = torch.tensor([[True] * 7 + [False] * 3])  # 7 valid: not square, floor((2j+1) * 7 / 8)
    assert _select("uniform", torch.zeros(1, 10, 2), valid, 4) == [[0, 2, 4, 6]]
    valid = torch.tensor([[True, False] * 8])  # 8 valid slots at even positions
    assert _select("uniform", torch.zeros(1, 16, 2), valid, 4) == [[2, 6, 10, 14]]  # ranks 1, 3, 5, 7


# --- DivPrune ------------------------------------------------------------------------------------
def _ray(degrees: float, norm: float = 1.0) -> list[float]:
    rad = math.radians(degrees)
    return [norm * math.cos(rad), norm * math.sin(rad)]


def _fan() -> torch.Tensor:
    """Tokens at 0, 10, 20, 100 and 200 degrees (1 - cos grows with the angle up to 180)."""
    return torch.tensor([[_ray(0, 2.0), _ray(10, 0.5), _ray(20, 3.0), _ray(100), _ray(200, 7.0)]])


def test_divprune_greedy_max_min_order_on_a_fan():
    # step 0: 200 deg (nearest other at 100 deg apart); then the farthest from {200}: 20 deg (180);
    # then from {200, 20}: 100 deg (80 vs 20 and 10); then 0 deg (20) before 10 deg (10)
    order = baselines.divprune_order(_fan(), _all_valid(1, 5), 5)
    assert order.tolist() == [[4, 2, 3, 0, 1]]
    assert _select("divprune", _fan(), _all_valid(1, 5), 3) == [[2, 3, 4]]


def test_divprune_is_scale_invariant_and_skips_duplicates():
    x = torch.cat([_fan(), _fan()[:, :1] * 5], dim=1)  # token 5 duplicates token 0
    order = baselines.divprune_order(x, _all_valid(1, 6), 6)[0].tolist()
    assert order[:5] == [4, 2, 3, 0, 1] and order[5] == 5  # the duplicate comes last, at distance 0


def test_divprune_ties_go_to_the_lowest_index():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]])  # a square: all isolations 1
    assert baselines.divprune_order(x, _all_valid(1, 4), 4).tolist() == [[0, 2, 1, 3]]


def test_divprune_never_picks_padding_even_when_it_is_most_isolated():
    x = torch.cat([_fan(), torch.tensor([[_ray(300, 9.0), _ray(150)]])], dim=1)
    valid = torch.tensor([[True] * 5 + [False] * 2])
    assert baselines.divprune_order(x, valid, 5).tolist() == [[4, 2, 3, 0, 1]]
    assert baselines.divprune_order(x, valid, 7)[0, 5:].tolist() == [5, 6]


def _reference_order(v: torch.Tensor, k: int) -> list[int]:
    """The published greedy, written out with Python loops on one image (N, D)."""
    u = v / v.norm(dim=-1, keepdim=True)
    d = (1.0 - u @ u.T).tolist()
    n = len(d)
    chosen = [max(range(n), key=lambda j: (min(d[i][j] for i in range(n) if i != j), -j))]
    while len(chosen) < k:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (min(d[s][j] for s in chosen), -j)))
    return chosen


def test_divprune_matches_the_published_greedy():
    x = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(3))
    got = baselines.divprune_order(x, _all_valid(2, 40), 12).tolist()
    assert got == [_reference_order(x[0], 12), _reference_order(x[1], 12)]


def test_divprune_runs_in_fp32_for_half_inputs():
    x = torch.randn(1, 30, 8, generator=torch.Generator().manual_seed(4))
    expected = [_reference_order(x[0].half().float(), 6)]
    assert baselines.divprune_order(x.half(), _all_valid(1, 30), 6).tolist() == expected
