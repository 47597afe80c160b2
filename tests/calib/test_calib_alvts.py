"""``vtprune calib alvts`` on tiny models: the factors, the card, the checks when loading them."""

from __future__ import annotations

import json

import pytest
import torch

from vtprune.calib.alvts import calibrate
from vtprune.calib.config import CalibConfig
from vtprune.config import PruneConfig
from vtprune.errors import CheckpointError, ConfigError, InputError
from vtprune.prune.factors import load_factors, save_factors
from vtprune.runtime.pipeline import PrunedVlm


def _pairs(scene, n=4):
    from PIL import Image

    out = []
    for i in range(n):
        img = scene.copy() if i % 2 == 0 else Image.new("RGB", scene.size, (30 * i, 200, 40))
        out.append((img, ["what color is the shape ?", "is there a circle ?"][i % 2]))
    return out


@pytest.fixture
def calibrated(tiny_adapter, scene, tmp_path):
    cfg = CalibConfig(n=4, heldout=0.5, k=2, ranks=(4, 8, 64))
    selectors, card = calibrate(tiny_adapter, _pairs(scene), cfg)
    return tiny_adapter, selectors, card, save_factors(selectors, card, tmp_path / "factors")


def test_card_and_factors(calibrated):
    adapter, selectors, card, out = calibrated
    dims = adapter.text_dims()
    assert sorted(selectors) == list(range(dims.layers))
    assert card["pairs"] == {"fit": 2, "heldout": 2} and len(card["layers"]) == dims.layers
    for row in card["layers"]:
        assert row["rank"] in (4, 8) or row["rank"] == min(64, dims.hidden)
        assert 0.0 <= row["recall"] <= 1.0 and row["recall"] == row["recall_by_rank"][str(row["rank"])]
    loaded = load_factors(out, adapter)
    assert all(torch.equal(loaded[i].a, selectors[i].a) and loaded[i].scale == selectors[i].scale for i in selectors)


def test_full_rank_calibrated_selector_reaches_the_best_recall(calibrated):
    _, _, card, _ = calibrated
    for row in card["layers"]:  # the rank picked is the smallest reaching gamma, or the best one
        best = max(row["recall_by_rank"].values())
        assert row["recall"] >= 0.9 or row["recall"] == best


def test_calibrated_factors_drive_generation(calibrated, scene):
    adapter, _, _, out = calibrated
    g = PrunedVlm(adapter, PruneConfig("alvts", 2, layer=1, factors=str(out))).generate(scene, "what ?", 3)
    assert g.layer_visual_tokens[1:] == [2] * (len(g.layer_visual_tokens) - 1)


def test_tampered_or_foreign_factors_are_refused(calibrated, tmp_path, tiny_dirs):

    adapter, selectors, card, out = calibrated
    (out / "factors.safetensors").write_bytes((out / "factors.safetensors").read_bytes()[:-4] + b"oops")
    with pytest.raises(CheckpointError, match="sha256"):
        load_factors(out, adapter)
    other = save_factors(selectors, card | {"model": {"hidden": 1, "layers": 1}}, tmp_path / "other")
    with pytest.raises(ConfigError, match="calibrated for hidden=1"):
        load_factors(other, adapter)
    with pytest.raises(InputError, match="not a 'vtprune calib alvts' output"):
        load_factors(tmp_path, adapter)
    with pytest.raises(InputError, match="exists; pass --force"):
        save_factors(selectors, card, other)
    assert json.loads((other / "card.json").read_text())["model"]["hidden"] == 1  # untouched


def test_calib_config_errors():
    for bad in (dict(n=1), dict(heldout=1.0), dict(k=0), dict(query="all"), dict(gamma=0.0), dict(mode="x"),
                dict(rank=0), dict(steps=-1), dict(batch=0), dict(lr=0.0)):  # fmt: skip
        with pytest.raises(ConfigError):
            CalibConfig(**bad)


# --- the paper's calibration (--mode paper) ---------------------------------------------------------
def test_paper_calibration_writes_paper_factors_that_drive_the_paper_selector(tiny_adapter, scene, tmp_path):
    from vtprune.calib.alvts import calibrate_paper

    cfg = CalibConfig(n=4, heldout=0.5, k=2, mode="paper", rank=4, steps=3, batch=2)
    selectors, card = calibrate_paper(tiny_adapter, _pairs(scene), cfg)
    again, _ = calibrate_paper(tiny_adapter, _pairs(scene), cfg)
    assert all(torch.equal(selectors[i].a, again[i].a) for i in selectors)  # deterministic for the seed
    assert card["kind"] == "paper" and card["pairs"] == {"fit": 2, "heldout": 2}
    for row in card["layers"]:
        assert row["rank"] == 4 and 0.0 <= row["recall"] <= 1.0 and -1.0 <= row["spearman"] <= 1.0
        assert row["loss_after"] >= 0.0 and row["loss_before"] >= 0.0
    out = save_factors(selectors, card, tmp_path / "paper")
    with pytest.raises(ConfigError, match="use them with --selector paper"):
        load_factors(out, tiny_adapter)  # not the whitened low-rank selector's factors
    cfg = PruneConfig("alvts", 2, layer=0, selector="paper", factors=str(out))
    g = PrunedVlm(tiny_adapter, cfg).generate(scene, "what ?", 2)
    assert g.layer_visual_tokens == [2] * len(g.layer_visual_tokens)


def test_paper_fit_lowers_the_loss_where_the_svd_initialisation_misses():
    """On a layer whose attention is far from rank R, tuning the factors reduces the MSE to the full-rank
    score on the fit pairs (the paper's objective)."""
    from vtprune.calib.alvts import _fit_layer, _paper_loss, _PaperPair, _unit_mean, full_rank_score
    from vtprune.prune.alvts import paper_selector
    from vtprune.prune.attention import QkWeights

    g = torch.Generator().manual_seed(0)
    d, heads, hd, n = 16, 4, 4, 12
    w = QkWeights(3 * torch.randn(heads * hd, d, generator=g), 3 * torch.randn(2 * hd, d, generator=g), None, None,
                  heads, 2, hd)  # fmt: skip
    visual, text = torch.arange(2, 9), torch.arange(9, n)
    rope = (torch.ones(n, hd), torch.zeros(n, hd))  # identity rotation
    pairs = []
    for _ in range(6):
        x = torch.randn(n, d, generator=g)
        pairs.append(_PaperPair(x, visual, text, _unit_mean(full_rank_score(w, x, rope, visual, text))))
    cfg = CalibConfig(mode="paper", rank=2, steps=150, batch=6, lr=3e-2)
    before = float(_paper_loss(paper_selector(w, 2), pairs))
    after = float(_paper_loss(_fit_layer(w, pairs, cfg, 0), pairs))
    assert after < 0.8 * before  # 0.53 measured on the 2-core Xeon
