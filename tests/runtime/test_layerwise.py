"""In-LLM methods (ALVTS, FastV, DART) through the layer-by-layer decoder, on every tiny family."""

from __future__ import annotations

import pytest
import torch

from vtprune.config import PruneConfig
from vtprune.prune.attention import QkWeights, attention_rows
from vtprune.runtime.layerwise import AlvtsRouter, LayerwiseDecoder, Router, Trace, build_router
from vtprune.runtime.pipeline import PrunedVlm

QUESTION = "what color is the shape ?"


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


def _prefill(adapter, scene, cfg):
    pipe = PrunedVlm(adapter, cfg)
    return pipe, pipe.build_prefill(pipe.inputs(scene, QUESTION))


def _last_logits(pipe, prefill, cache=None):
    cache = cache if cache is not None else pipe.new_cache()
    _, hidden = pipe.layerwise_prefill(prefill, cache)
    return pipe.adapter.lm_head(hidden[:, -1])


@pytest.mark.parametrize("cfg", [PruneConfig("alvts", 10**6, layer=0), PruneConfig("alvts", 1.0, layer=0, skip="kv"),
                                 PruneConfig("fastv", 1.0, layer=1), PruneConfig("dart", 10**6, layer=1)],
                         ids=["alvts", "alvts-kv", "fastv", "dart"])  # fmt: skip
def test_keeping_every_token_equals_the_unpruned_model(tiny_adapter, scene, cfg):
    pipe, prefill = _prefill(tiny_adapter, scene, cfg)
    ref = PrunedVlm(tiny_adapter, PruneConfig()).prompt_logits(prefill)[:, -1]
    assert (_last_logits(pipe, prefill) - ref).abs().max().item() <= 1e-5
    assert pipe.last_trace.visual == [prefill.visual_rows.numel()] * len(tiny_adapter.decoder.layers)


@pytest.mark.parametrize("cfg", [PruneConfig("alvts", 10**6, layer=0), PruneConfig("alvts", 1.0, layer=0, skip="kv"),
                                 PruneConfig("alvts", 1.0, layer=0, query="instruction"),
                                 PruneConfig("alvts", 1.0, layer=0, selector="paper"),
                                 PruneConfig("fastv", 1.0, layer=1), PruneConfig("dart", 10**6, layer=1)],
                         ids=["alvts", "alvts-kv", "alvts-instruction", "alvts-paper", "fastv", "dart"])  # fmt: skip
def test_selecting_every_token_equals_the_unpruned_model(tiny_adapter, scene, cfg):
    """The same invariant through the selection path itself: each layer scores, chooses all N visual rows
    and gathers, routes and scatters them back (no shortcut for k = N)."""
    pipe, prefill = _prefill(tiny_adapter, scene, cfg)
    n_v = prefill.visual_rows.numel()
    router = build_router(cfg, tiny_adapter, prefill.embeds.shape[1] - n_v, n_v)
    router.skip_full_budgets = False
    hidden, trace = LayerwiseDecoder(tiny_adapter, router).prefill(
        prefill.embeds, prefill.position_ids, prefill.visual_rows, prefill.query_rows(cfg.query), pipe.new_cache()
    )
    selecting = [i for i in range(len(tiny_adapter.decoder.layers)) if router.selects(i)]
    assert selecting and sorted(trace.selected) == selecting  # the selector ran where the method selects
    assert all(trace.selected[i].tolist() == list(range(n_v)) for i in selecting)
    ref = PrunedVlm(tiny_adapter, PruneConfig()).prompt_logits(prefill)[:, -1]
    assert (tiny_adapter.lm_head(hidden[:, -1]) - ref).abs().max().item() <= 1e-5


class _Recorder:
    """Wraps a router (what ``LayerwiseDecoder`` calls) and records every layer's input and chosen rows."""

    def __init__(self, inner: Router) -> None:
        self.inner, self.drops, self.kv_visible = inner, inner.drops, inner.kv_visible
        self.inputs, self.rows = [], []

    def plan(self, index, layer, ctx, trace):
        rows = self.inner.plan(index, layer, ctx, trace)
        self.inputs.append(ctx.hidden.clone())
        self.rows.append(rows)
        return rows


def _routed(adapter, scene, cfg, cache=None):
    pipe, prefill = _prefill(adapter, scene, cfg)
    n_v = prefill.visual_rows.numel()
    router = _Recorder(build_router(cfg, adapter, prefill.embeds.shape[1] - n_v, n_v))
    cache = cache if cache is not None else pipe.new_cache()
    hidden, trace = LayerwiseDecoder(adapter, router).prefill(
        prefill.embeds, prefill.position_ids, prefill.visual_rows, prefill.query_rows(cfg.query), cache
    )
    return prefill, router, trace, cache, hidden


@pytest.mark.parametrize("skip", ["full", "kv"])
def test_skipped_rows_pass_each_layer_bit_identical(tiny_adapter, scene, skip):
    k = 2
    prefill, rec, trace, _, _ = _routed(tiny_adapter, scene, PruneConfig("alvts", k, layer=0, skip=skip))
    n = prefill.embeds.shape[1]
    for i in range(len(rec.inputs) - 1):
        rows = rec.rows[i]
        assert rows is not None and torch.equal(rows, rows.sort().values)
        skipped = torch.ones(n, dtype=torch.bool)
        skipped[rows] = False
        assert int(skipped.sum()) == prefill.visual_rows.numel() - k  # only visual rows are ever skipped
        before, after = rec.inputs[i][0, skipped], rec.inputs[i + 1][0, skipped]
        assert torch.equal(before, after)
        assert not torch.equal(rec.inputs[i][0, rows], rec.inputs[i + 1][0, rows])  # processed rows changed


@pytest.mark.parametrize("skip", ["full", "kv"])
def test_kv_cache_holds_what_each_layer_processed(tiny_adapter, scene, skip):
    k, layer0 = 2, 1
    prefill, _, trace, cache, _ = _routed(tiny_adapter, scene, PruneConfig("alvts", k, layer=layer0, skip=skip))
    n, n_v = prefill.embeds.shape[1], prefill.visual_rows.numel()
    lengths = [cache.layers[i].keys.shape[-2] for i in range(len(tiny_adapter.decoder.layers))]
    expected = [n] * layer0 + [n if skip == "kv" else n - n_v + k] * (len(lengths) - layer0)
    assert lengths == expected
    assert trace.visual == [n_v] * layer0 + [k] * (len(lengths) - layer0)


class _Replay:
    """Replays recorded row choices on a prompt extended by one text token at the end (a plan-only router)."""

    def __init__(self, rows, drops, kv_visible, n):
        self.rows, self.drops, self.kv_visible, self.n = rows, drops, kv_visible, n

    def plan(self, index, layer, ctx, trace):
        rows = self.rows[index]
        if rows is None:
            return None
        return torch.cat([rows, torch.tensor([ctx.hidden.shape[1] - 1])])  # the new token is always processed


@pytest.mark.parametrize("cfg", [PruneConfig("alvts", 2, layer=1), PruneConfig("alvts", 2, layer=1, skip="kv"),
                                 PruneConfig("fastv", 2, layer=1), PruneConfig("dart", 2, layer=1)],
                         ids=["alvts", "alvts-kv", "fastv", "dart"])  # fmt: skip
def test_decode_step_after_routed_prefill_matches_a_longer_prefill(tiny_adapter, scene, cfg):
    """One cached decode step equals re-running the prefill with the same choices plus the new token."""
    prefill, rec, _, cache, hidden = _routed(tiny_adapter, scene, cfg)
    pipe = PrunedVlm(tiny_adapter, cfg)
    decoder = LayerwiseDecoder(tiny_adapter, rec)
    token = int(tiny_adapter.lm_head(hidden[:, -1]).argmax())
    embeds = tiny_adapter.embed_tokens(torch.tensor([[token]]))
    next_pos = prefill.position_ids.amax(dim=-1, keepdim=True) + 1
    stepped = tiny_adapter.lm_head(decoder.step(embeds, next_pos, cache)[:, -1])

    longer_embeds = torch.cat([prefill.embeds, embeds], dim=1)
    longer_pos = torch.cat([prefill.position_ids, next_pos], dim=-1)
    replay = _Replay(rec.rows, rec.drops, rec.kv_visible, prefill.embeds.shape[1])
    ref_hidden, _ = LayerwiseDecoder(tiny_adapter, replay).prefill(
        longer_embeds, longer_pos, prefill.visual_rows, torch.tensor([prefill.embeds.shape[1]]), pipe.new_cache()
    )
    ref = tiny_adapter.lm_head(ref_hidden[:, -1])
    assert (stepped - ref).abs().max().item() <= 1e-5


def test_alvts_generation_report(tiny_adapter, scene):
    g = PrunedVlm(tiny_adapter, PruneConfig("alvts", 2, layer=1)).generate(scene, QUESTION, max_new_tokens=4)
    layers = len(tiny_adapter.decoder.layers)
    assert g.layer_visual_tokens[0] == g.visual_tokens_total and g.layer_visual_tokens[1:] == [2] * (layers - 1)
    assert g.visual_tokens_kept == 2 and g.prefill_tokens == g.prompt_tokens
    assert 0 < g.flops.prefill_macs_pruned < g.flops.prefill_macs_unpruned and g.flops.prune_stage_macs > 0
    dims = tiny_adapter.text_dims()
    assert len(g.layer_macs) == layers and g.layer_macs[0] > g.layer_macs[1]
    assert sum(g.layer_macs) + dims.hidden * dims.vocab == g.flops.prefill_macs_pruned + g.flops.prune_stage_macs
    assert len(g.token_ids) >= 1


def test_fastv_scores_are_the_eager_attention_of_the_last_token(tiny_adapter, scene):
    """The recomputed attention row equals the model's own eager attention probabilities."""
    pipe, prefill = _prefill(tiny_adapter, scene, PruneConfig())
    decoder = tiny_adapter.decoder
    layer = decoder.layers[0]
    captured = {}
    attn = layer.self_attn
    def grab(module, args, out):
        captured["w"] = out[1]

    hook = attn.register_forward_hook(grab)
    previous = tiny_adapter.text_config._attn_implementation
    tiny_adapter.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            mask = torch.ones(1, prefill.embeds.shape[1], dtype=torch.long)
            decoder(inputs_embeds=prefill.embeds, position_ids=prefill.position_ids, attention_mask=mask)
    finally:
        hook.remove()
        tiny_adapter.model.set_attn_implementation(previous)
    ref = captured["w"][0, :, -1]  # (H, n) the last token's attention
    dims = tiny_adapter.text_dims()
    x = layer.input_layernorm(prefill.embeds)[0]
    cos, sin = decoder.rotary_emb(prefill.embeds, prefill.position_ids)
    rows = torch.arange(x.shape[0])
    ours = attention_rows(QkWeights.of(attn, dims.heads, dims.kv_heads), x[-1:], x, (cos[0, -1:], sin[0, -1:]),
                          (cos[0], sin[0]), rows[-1:], rows)[:, 0]  # fmt: skip
    assert (ours - ref).abs().max().item() <= 1e-5


def test_flops_matched_budget_spends_at_most_the_target():
    from vtprune.flops import TextDims, layer_macs
    from vtprune.runtime.layerwise import alvts_budgets

    dims = TextDims(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152)
    n_text, n_v, keep, rank = 40, 256, 28, 64
    budgets = alvts_budgets(PruneConfig("alvts", keep, layer=2, budget="flops", rank=rank), dims, n_text, n_v, rank)
    k = budgets[-1]
    assert budgets == [n_v] * 2 + [k] * 28 and 1 <= k < keep  # two full layers must be paid for

    def cost(kk):
        sel = n_v * dims.hidden * rank + dims.hidden * rank + n_v * dims.hidden + n_v * rank  # one query
        return 2 * layer_macs(dims, n_text + n_v) + 28 * (layer_macs(dims, n_text + kk) + sel)

    target = 30 * layer_macs(dims, n_text + keep)
    assert cost(k) <= target < cost(k + 1)
    constant = alvts_budgets(PruneConfig("alvts", keep, layer=2), dims, n_text, n_v, rank)
    assert constant == [n_v] * 2 + [keep] * 28


def test_alvts_router_trace_names_image_token_ids(tiny_adapter, scene):
    prefill, rec, trace, _, _ = _routed(tiny_adapter, scene, PruneConfig("alvts", 3, layer=0))
    assert isinstance(rec.inner, AlvtsRouter) and isinstance(trace, Trace)
    for layer, ids in trace.selected.items():
        assert ids.numel() == 3 and int(ids.max()) < prefill.visual_rows.numel()
        assert torch.equal(prefill.visual_rows[ids], rec.rows[layer][torch.isin(rec.rows[layer], prefill.visual_rows)])


class _Fixed:
    """The same rows at every layer: equivalent to pruning before the LLM (a plan-only router)."""

    drops = kv_visible = False

    def __init__(self, rows):
        self.rows = rows

    def plan(self, index, layer, ctx, trace):
        return self.rows


def test_subset_rows_equal_transformers_on_the_gathered_sequence(tiny_adapter, scene):
    """Skipping the same visual rows in every layer equals transformers' forward on the pruned sequence
    (original position ids): an independent check of the gather, RoPE and mask of the subset path."""
    pipe, prefill = _prefill(tiny_adapter, scene, PruneConfig())
    n, visual = prefill.embeds.shape[1], prefill.visual_rows
    keep_visual = visual[torch.tensor([1, 4, 5, 9, visual.numel() - 1]) % visual.numel()].unique()
    is_text = torch.ones(n, dtype=torch.bool)
    is_text[visual] = False
    rows = torch.cat([is_text.nonzero().squeeze(-1), keep_visual]).sort().values
    ours, _ = LayerwiseDecoder(tiny_adapter, _Fixed(rows)).prefill(
        prefill.embeds, prefill.position_ids, visual, torch.tensor([n - 1]), pipe.new_cache()
    )
    ref = pipe.decoder_step(prefill.embeds[:, rows], prefill.position_ids[..., rows], pipe.new_cache())
    assert (ours[:, rows] - ref).abs().max().item() <= 1e-5


def test_dart_margin_replays_pivots_and_claims_towards_another_set():
    from vtprune.prune.ties import as_mask
    from vtprune.runtime.layerwise import _dart_steps, dart_select

    torch.manual_seed(3)
    x, norms = torch.randn(12, 8), torch.rand(12) + 1.0
    own = dart_select(x, norms, 6, 2)
    kept, tie = _dart_steps(x[None], norms[None], 6, 2, as_mask(own[None], 12))
    assert torch.equal(kept[0], own) and tie.item() == 0.0
    weakest = int(norms.argmin())
    assert weakest not in own.tolist()
    other = torch.cat([own[1:], torch.tensor([weakest])]).sort().values  # the weakest key norm kept instead
    _, far = _dart_steps(x[None], norms[None], 6, 2, as_mask(other[None], 12))
    assert far.item() > 1e-2
