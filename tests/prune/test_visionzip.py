"""VisionZip on hand-built inputs with known answers (budget split, CLS attention, dominant tokens,
contextual groups), the adapter seam against the tower's own eager attention, the PyTorch pipeline on
tiny-llava, and the refusals (Qwen2.5-VL has no [CLS] token; LLaVA-NeXT is not built yet)."""

from __future__ import annotations

import math

import pytest
import torch

from vtprune.config import PruneConfig
from vtprune.errors import UnsupportedModelError
from vtprune.prune import VisualLayout, merge_visual, select_visual, selector, visionzip


# --- budget split --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("k", "split"),
    [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)), (32, (27, 5)), (16, (14, 2)), (2, (1, 1)), (1, (1, 0)),
     (0, (0, 0))],
)  # fmt: skip
def test_visionzip_budget_split_follows_the_paper(k: int, split: tuple[int, int]):
    assert visionzip.split_budget(k) == split


def test_visionzip_budget_split_keeps_a_contextual_token_for_every_budget_of_two_or_more():
    for k in range(2, 600):
        d, c = visionzip.split_budget(k)
        assert d + c == k and c >= 1 and d >= 1 and abs(d - k * 54 / 64) <= 1, k


def test_visionzip_stage_macs_count_the_cls_row_key_cosines_and_group_sums():
    from vtprune.flops import prune_stage_macs

    assert prune_stage_macs(PruneConfig("visionzip", 64), [576], 1024) == (10 + 2) * 576 * 1024  # 54 + 10
    assert prune_stage_macs(PruneConfig("visionzip", 0.25), [576], 1024) == (22 + 2) * 576 * 1024  # 144 = 122 + 22
    assert prune_stage_macs(PruneConfig("visionzip", 576), [576], 1024) == 0  # every token kept as is


# --- CLS attention -------------------------------------------------------------------------------
def test_visionzip_cls_attention_is_the_softmax_row_summed_over_heads():
    q = torch.tensor([[[1.0], [2.0]]])  # (B=1, H=2, hd=1)
    keys = torch.tensor([[[[0.0], [1.0], [2.0]], [[1.0], [0.0], [-1.0]]]])  # (1, 2, T=3, 1)
    got = visionzip.cls_attention(q, keys, scale=0.5)
    head0 = [math.exp(0.5 * v) for v in (0.0, 1.0, 2.0)]
    head1 = [math.exp(0.5 * 2 * v) for v in (1.0, 0.0, -1.0)]
    want = [a / sum(head0) + b / sum(head1) for a, b in zip(head0, head1, strict=True)]
    assert got.shape == (1, 3)
    assert got[0].tolist() == pytest.approx(want, rel=1e-6)


# --- dominant and contextual tokens --------------------------------------------------------------
def _evidence(attn: list[float], keys: list[list[float]]) -> torch.Tensor:
    return torch.cat([torch.tensor(attn)[:, None], torch.tensor(keys)], dim=-1)[None]  # (1, N, 1 + hd)


def test_visionzip_dominant_tokens_are_the_highest_cls_attention():
    attn = [0.1, 0.9, 0.3, 0.8, 0.05, 0.2, 0.7, 0.6]
    ev = _evidence(attn, [[1.0, 0.0]] * 8)
    # k=4: 3 dominant (1, 3, 6), 1 contextual whose target is the first remaining token (rank 0: index 0)
    kept = selector("visionzip")(ev, torch.ones(1, 8, dtype=torch.bool), 4, PruneConfig("visionzip", 4))
    assert kept.tolist() == [[0, 1, 3, 6]]
    # k=5: 4 dominant (1, 3, 6, 7) + 1 target (index 0)
    kept = selector("visionzip")(ev, torch.ones(1, 8, dtype=torch.bool), 5, PruneConfig("visionzip", 5))
    assert kept.tolist() == [[0, 1, 3, 6, 7]]


# 20 tokens, k=13: 11 dominant (the even indices and 19), 2 contextual. The 9 remaining tokens (odd
# 1..17) have ranks 0..8; step 9 // 2 = 4, so the targets are ranks 0 and 4: indices 1 and 9.
DOMINANT = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 19]
KEYS = {1: [1.0, 0.0], 9: [0.0, 1.0], 3: [1.0, 0.1], 5: [2.0, 0.2], 15: [1.0, 0.2],  # -> target 1
        7: [0.1, 1.0], 11: [0.0, 3.0], 13: [0.2, 1.0], 17: [-1.0, 0.5]}  # -> target 9  # fmt: skip
GROUPS = {1: [1, 3, 5, 15], 9: [9, 7, 11, 13, 17]}


def _known_grouping() -> tuple[torch.Tensor, torch.Tensor]:
    attn = [1.0 + i / 100 if i in DOMINANT else i / 1000 for i in range(20)]
    keys = [KEYS.get(i, [1.0, 0.0]) for i in range(20)]  # dominant keys point at target 1: never merged
    x = torch.stack([torch.tensor([float(i), float(i * i), 1.0]) for i in range(20)])[None]  # (1, 20, 3)
    return x, _evidence(attn, keys)


def test_visionzip_contextual_tokens_average_their_key_groups():
    x, ev = _known_grouping()
    valid = torch.ones(1, 20, dtype=torch.bool)
    kept = selector("visionzip")(ev, valid, 13, PruneConfig("visionzip", 13))
    assert kept[0].tolist() == sorted(DOMINANT + [1, 9])
    merged = visionzip.merge(x, ev, valid, 13)
    for target, members in GROUPS.items():
        assert torch.allclose(merged[0, target], x[0, members].mean(dim=0)), target
    untouched = [i for i in range(20) if i not in GROUPS]
    assert torch.equal(merged[0, untouched], x[0, untouched])  # dominant (and merged-away) rows as they were


def test_visionzip_merge_on_padded_groups_matches_the_unpadded_group():
    x, ev = _known_grouping()
    padded_at = [2, 7, 8, 15, 21, 22]  # 6 padding slots interleaved, 26 slots
    order = [s for s in range(26) if s not in padded_at]
    xp, evp = torch.zeros(1, 26, 3), torch.zeros(1, 26, 3)
    xp[0, order], evp[0, order] = x[0], ev[0]
    evp[0, padded_at, 0] = 100.0  # padding with the highest attention is still never dominant
    valid = torch.zeros(1, 26, dtype=torch.bool)
    valid[0, order] = True
    kept = selector("visionzip")(evp, valid, 13, PruneConfig("visionzip", 13))[0]
    assert kept.tolist() == [order[i] for i in sorted(DOMINANT + [1, 9])]
    merged = visionzip.merge(xp, evp, valid, 13)
    for target, members in GROUPS.items():
        assert torch.allclose(merged[0, order[target]], x[0, members].mean(dim=0))


def test_visionzip_budget_covering_the_group_keeps_every_token_unmerged():
    x, ev = _known_grouping()
    valid = torch.ones(1, 20, dtype=torch.bool)
    assert selector("visionzip")(ev, valid, 20, PruneConfig("visionzip", 20)).tolist() == [list(range(20))]
    assert torch.equal(visionzip.merge(x, ev, valid, 20), x)
    valid[0, 15:] = False  # 15 valid tokens, budget 16 (padding fills the last slot)
    kept = selector("visionzip")(ev, valid, 16, PruneConfig("visionzip", 16))[0].tolist()
    assert kept == list(range(16))
    assert torch.equal(visionzip.merge(x, ev, valid, 16)[0, :15], x[0, :15])


def test_visionzip_merge_visual_works_group_by_group():
    x, ev = _known_grouping()
    layout = VisualLayout(40, (torch.arange(20), torch.arange(20, 40)), torch.zeros(0, dtype=torch.long), ("a", "b"))
    xx, evv = torch.cat([x, x * 2], dim=1), torch.cat([ev, ev], dim=1)  # (1, 40, .) two copies
    cfg = PruneConfig("visionzip", 26)  # 13 per group
    kept = select_visual(evv, layout, cfg)[0].tolist()
    assert kept == sorted(DOMINANT + [1, 9]) + [20 + i for i in sorted(DOMINANT + [1, 9])]
    merged = merge_visual(xx, evv, layout, cfg)
    assert torch.allclose(merged[0, 29], 2 * x[0, GROUPS[9]].mean(dim=0))  # group b's target 9


# --- the adapter seam and the pipeline -----------------------------------------------------------
@pytest.fixture(scope="module")
def llava(tiny_dirs):
    from vtprune.models import load_vlm

    return load_vlm(tiny_dirs["tiny-llava"])


def _eager_cls_attention(adapter, pixels: torch.Tensor) -> torch.Tensor:
    """The feature layer's CLS row from the tower's own eager attention (not the seam's recompute)."""
    from vtprune.models.llava import feature_layer_index

    tower = adapter.model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        out = tower(pixels, output_attentions=True)
    finally:
        tower.set_attn_implementation("sdpa")
    p = feature_layer_index(adapter.config.vision_feature_layer, adapter.config.vision_config.num_hidden_layers)
    return out.attentions[p - 1][:, :, 0, 1:].sum(dim=1)  # (B, N)


def test_visionzip_seam_recomputes_the_towers_cls_attention(llava, scene):
    inputs = llava.prepare(scene, llava.format_prompt("what color ?"))
    with torch.inference_mode():
        enc = llava.encoder_tokens(inputs)
        want = _eager_cls_attention(llava, inputs["pixel_values"])
        unpruned = llava.encode_image(inputs).embeds  # (1, 64, D)
        assert torch.allclose(enc.evidence[..., 0], want, atol=1e-6)
        assert torch.allclose(llava.project(enc.features), unpruned, atol=1e-5)  # same features, CLS dropped


def test_visionzip_pipeline_keeps_dominant_and_contextual_tokens(llava, scene):
    from vtprune.runtime.pipeline import PrunedVlm

    pipe = PrunedVlm(llava, PruneConfig("visionzip", 16))
    inputs = pipe.inputs(scene, "what color ?")
    with torch.inference_mode():
        prefill = pipe.build_prefill(inputs)
        dominant = set(_eager_cls_attention(llava, inputs["pixel_values"])[0].topk(14).indices.tolist())
        full = PrunedVlm(llava, PruneConfig()).build_prefill(inputs)
    kept = prefill.visual_keep[0].tolist()
    assert len(kept) == 16 and kept == sorted(kept) and dominant <= set(kept)
    assert prefill.embeds.shape[1] == full.embeds.shape[1] - 64 + 16
    rows = {int(i): r for r, i in zip(prefill.visual_rows.tolist(), kept, strict=True)}
    full_rows = dict(zip(range(64), full.visual_rows.tolist(), strict=True))
    for i in dominant:  # a dominant token goes through the projector unchanged
        assert torch.allclose(prefill.embeds[0, rows[i]], full.embeds[0, full_rows[i]], atol=1e-5)
    contextual = [i for i in kept if i not in dominant]
    assert len(contextual) == 2
    assert not torch.allclose(prefill.embeds[0, rows[contextual[0]]], full.embeds[0, full_rows[contextual[0]]])
    image_start = int(full.position_ids[0, full.visual_rows[0]])
    assert prefill.position_ids[0, prefill.visual_rows].tolist() == [image_start + i for i in kept]


def test_visionzip_pipeline_with_every_token_kept_equals_the_unpruned_model(llava, scene):
    from vtprune.runtime.pipeline import PrunedVlm

    inputs = PrunedVlm(llava, PruneConfig()).inputs(scene, "what color ?")
    with torch.inference_mode():
        a = PrunedVlm(llava, PruneConfig("visionzip", 64)).build_prefill(inputs)
        b = PrunedVlm(llava, PruneConfig()).build_prefill(inputs)
    assert torch.equal(a.seq_keep, b.seq_keep) and torch.allclose(a.embeds, b.embeds, atol=1e-5)


@pytest.mark.parametrize(("model", "fragment"), [("tiny-qwen2.5-vl", "[CLS]"), ("tiny-llava-next", "LLaVA-NeXT")])
def test_visionzip_refuses_models_without_the_seam(model: str, fragment: str, tiny_dirs):
    from vtprune.models import load_vlm
    from vtprune.runtime.pipeline import PrunedVlm

    adapter = load_vlm(tiny_dirs[model])
    with pytest.raises(UnsupportedModelError, match="visionzip") as err:
        PrunedVlm(adapter, PruneConfig("visionzip", 16))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    PrunedVlm(adapter, PruneConfig("divprune", 16))  # other pre-LLM methods still run there
