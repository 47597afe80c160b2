"""The pooling baseline: grid choice, bins and centres, the merge, the pipeline on every family, and the
LLaVA-NeXT export refusal (exports of the other families: tests/export/test_baseline_export.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtprune.config import PruneConfig
from vtprune.errors import BudgetError, ConfigError
from vtprune.prune import VisualLayout, select_visual, selector
from vtprune.prune.pool import merge, pool_plan, pooled_grid, scores


@pytest.mark.parametrize(
    ("h", "w", "k", "grid"),
    [(16, 16, 64, (8, 8)), (16, 16, 16, (4, 4)), (16, 16, 128, (16, 8)), (16, 16, 32, (8, 4)), (24, 24, 64, (8, 8)),
     (24, 24, 576, (24, 24)), (4, 6, 6, (2, 3)), (6, 4, 6, (3, 2)), (5, 5, 4, (2, 2)), (16, 16, 1, (1, 1))],
)  # fmt: skip
def test_pooled_grid(h: int, w: int, k: int, grid: tuple[int, int]) -> None:
    assert pooled_grid(h, w, k) == grid


def test_pooled_grid_refuses_budgets_without_a_fitting_layout() -> None:
    with pytest.raises(BudgetError, match="cannot lay 37 tokens out"):
        pooled_grid(16, 16, 37)


@pytest.mark.parametrize(("h", "w", "k"), [(16, 16, 64), (16, 16, 128), (5, 5, 4), (5, 7, 6), (24, 24, 144)])
def test_plan_bins_cover_the_grid_and_centres_ascend(h: int, w: int, k: int) -> None:
    idx, m = pool_plan(h, w, k)
    assert idx.shape == (k,) and (np.diff(idx) > 0).all()
    others = np.setdiff1d(np.arange(h * w), idx)
    assert np.array_equal(m[others][:, others], np.eye(others.size, dtype=np.float32))  # untouched rows
    assert np.allclose(m[idx].sum(axis=1), 1.0)
    assert (m[idx] > 0).any(axis=0).all()  # every token lies in some bin
    assert (m[idx, idx] > 0).all()  # each centre lies in its own bin


def test_merge_is_the_window_mean() -> None:
    x = torch.randn(2, 256, 5)
    out = merge(x, 64)
    idx, _ = pool_plan(16, 16, 64)
    windows = x.reshape(2, 8, 2, 8, 2, 5).mean(dim=(2, 4)).reshape(2, 64, 5)
    assert torch.allclose(out[:, torch.as_tensor(idx)], windows, atol=1e-6)
    others = np.setdiff1d(np.arange(256), idx)
    assert torch.equal(out[:, torch.as_tensor(others)], x[:, torch.as_tensor(others)])
    s = scores(x, torch.ones(2, 256, dtype=torch.bool), 64)
    assert s.shape == (2, 256) and int(s[0].sum()) == 64


def test_select_visual_uses_the_layout_grid() -> None:
    cfg = PruneConfig(method="pool", keep=6)
    x = torch.randn(1, 24, 3)
    wide = VisualLayout(24, (torch.arange(24),), torch.zeros(0, dtype=torch.long), ("image",), grids=((4, 6),))
    keep = select_visual(x, wide, cfg)
    assert keep[0].tolist() == pool_plan(4, 6, 6)[0].tolist()
    square = VisualLayout(24, (torch.arange(24),), torch.zeros(0, dtype=torch.long), ("image",))
    with pytest.raises(BudgetError, match="not a square grid"):
        select_visual(x, square, cfg)
    margin = selector("pool").tie_margin(x, torch.ones(1, 24, dtype=torch.bool), 6, cfg, keep, (4, 6))
    assert float(margin[0]) == 0.0


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-llava-next", "tiny-qwen2.5-vl"])
def test_pool_in_the_pipeline(name: str, tiny_dirs, scene) -> None:
    from vtprune.models import load_vlm
    from vtprune.runtime.pipeline import PrunedVlm

    adapter = load_vlm(str(tiny_dirs[name]))
    pipe = PrunedVlm(adapter, PruneConfig(method="pool", keep=4))
    prefill = pipe.build_prefill(pipe.inputs(scene, "what is this?"))
    layout = prefill.layout
    assert prefill.visual_keep.shape[1] == 4 + layout.always_keep.numel()
    if layout.grids is not None:
        assert all(g is None or g[0] * g[1] == n for g, n in zip(layout.grids, layout.sizes, strict=True))
    assert pipe.generate(scene, "what is this?", 2).visual_tokens_kept == 4 + layout.always_keep.numel()


def test_pool_is_not_exported_for_llava_next(cache_dir, tmp_path) -> None:
    from vtprune.api import export_bundle
    from vtprune.export.bundle import ExportConfig

    with pytest.raises(ConfigError, match="varies per image"):
        export_bundle("tiny-llava-next", PruneConfig(method="pool", keep=4), ExportConfig(inline=True),
                      tmp_path / "b", cache_dir)  # fmt: skip
    assert not (tmp_path / "b").exists()
