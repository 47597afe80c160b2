"""Oracle and position-id tests: the pruned pipeline against transformers' own forward and generate."""

from __future__ import annotations

import pytest
import torch

from vtprune.config import PruneConfig
from vtprune.runtime.generate import decode
from vtprune.runtime.pipeline import PrunedVlm

QUESTION = "what color is the shape ?"
UNPRUNED_EQUIVALENT = [PruneConfig(), PruneConfig(method="gprune", keep=1.0)]


def _hf_inputs(adapter, scene):
    return PrunedVlm(adapter, PruneConfig()).inputs(scene, QUESTION)


@pytest.mark.parametrize("cfg", UNPRUNED_EQUIVALENT, ids=["none", "gprune-keep-1.0"])
def test_logits_match_transformers_forward(tiny_adapter, scene, cfg):
    pipe = PrunedVlm(tiny_adapter, cfg)
    inputs = pipe.inputs(scene, QUESTION)
    ours = pipe.prompt_logits(pipe.build_prefill(inputs))
    with torch.no_grad():
        ref = tiny_adapter.model(**inputs).logits
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-5


def test_full_integer_budget_matches_transformers_forward(tiny_adapter, scene):
    inputs = _hf_inputs(tiny_adapter, scene)
    n = sum(tiny_adapter.encode_image(inputs).layout.group_capacities)  # every group gets all its tokens
    pipe = PrunedVlm(tiny_adapter, PruneConfig(method="gprune", keep=n))
    with torch.no_grad():
        ref = tiny_adapter.model(**inputs).logits
    assert (pipe.prompt_logits(pipe.build_prefill(inputs)) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("cfg", UNPRUNED_EQUIVALENT, ids=["none", "gprune-keep-1.0"])
def test_greedy_generation_is_token_identical(tiny_adapter, scene, cfg):
    inputs = _hf_inputs(tiny_adapter, scene)
    with torch.no_grad():
        ref = tiny_adapter.model.generate(**inputs, max_new_tokens=10, do_sample=False)
    ref_new = ref[0, inputs["input_ids"].shape[1] :].tolist()
    ours = PrunedVlm(tiny_adapter, cfg).generate(scene, QUESTION, max_new_tokens=10).token_ids
    assert ours == ref_new[: len(ours)] and len(ours) == len(ref_new)


def test_pruned_prefill_keeps_original_positions(tiny_adapter, scene):
    pipe = PrunedVlm(tiny_adapter, PruneConfig(method="gprune", keep=0.25))
    inputs = pipe.inputs(scene, QUESTION)
    full = tiny_adapter.position_ids(inputs)
    prefill = pipe.build_prefill(inputs)
    expected = full[..., prefill.seq_keep[0]]
    assert torch.equal(prefill.position_ids, expected)
    assert prefill.seq_keep.shape[1] < inputs["input_ids"].shape[1]
    # all text tokens survive, in order, with their own positions
    text = (inputs["input_ids"][0] != tiny_adapter.image_token_id).nonzero().squeeze(-1)
    assert set(text.tolist()) <= set(prefill.seq_keep[0].tolist())
    assert prefill.seq_keep[0].diff().gt(0).all()


def test_positions_keep_the_unpruned_end_unless_contiguous(tiny_adapter, scene):
    gaps = PrunedVlm(tiny_adapter, PruneConfig(method="gprune", keep=0.25))
    inputs = gaps.inputs(scene, QUESTION)
    prefill = gaps.build_prefill(inputs)
    assert torch.equal(prefill.position_ids[..., -1], tiny_adapter.position_ids(inputs)[..., -1])
    if prefill.position_ids.dim() == 2:  # 1-D RoPE: pruning leaves gaps
        assert prefill.position_ids.diff().max() > 1
    contiguous = PrunedVlm(tiny_adapter, PruneConfig(method="gprune", keep=0.25, positions="contiguous"))
    p2 = contiguous.build_prefill(inputs)
    assert torch.equal(p2.position_ids[..., -1].flatten().unique(), torch.tensor([p2.seq_keep.shape[1] - 1]))


def test_decoding_continues_from_the_unpruned_length(tiny_adapter, scene, monkeypatch):
    pipe = PrunedVlm(tiny_adapter, PruneConfig(method="gprune", keep=4))
    inputs = pipe.inputs(scene, QUESTION)
    unpruned_next = int(tiny_adapter.position_ids(inputs).max()) + 1
    seen = []
    step = pipe.decoder_step
    monkeypatch.setattr(pipe, "decoder_step", lambda e, p, c: (seen.append(p.clone()), step(e, p, c))[1])
    tiny_adapter_eos = tiny_adapter.eos_token_ids()
    monkeypatch.setattr(tiny_adapter, "eos_token_ids", lambda: set())  # force several decode steps
    try:
        decode(pipe, pipe.build_prefill(inputs), 4)
    finally:
        monkeypatch.setattr(tiny_adapter, "eos_token_ids", lambda: tiny_adapter_eos)
    decode_positions = [p.flatten().unique().tolist() for p in seen[1:]]
    assert decode_positions == [[unpruned_next], [unpruned_next + 1], [unpruned_next + 2]]
    if inputs["input_ids"].shape[1] == unpruned_next:  # 1-D RoPE: the unpruned length itself
        assert seen[1].dim() == 2


def test_pruned_prefill_matches_transformers_on_the_same_pruned_sequence(tiny_adapter, scene):
    """Independent check of the merge: hand the pruned embeddings and positions to HF's own forward."""
    pipe = PrunedVlm(tiny_adapter, PruneConfig(method="gprune", keep=0.5))
    inputs = pipe.inputs(scene, QUESTION)
    prefill = pipe.build_prefill(inputs)
    ids, keep = inputs["input_ids"], prefill.seq_keep[0]
    with torch.no_grad():
        feats = tiny_adapter.encode_image(inputs).embeds
        embeds = tiny_adapter.model.get_input_embeddings()(ids)
        mask = (ids == tiny_adapter.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, feats)[:, keep]
        ref = tiny_adapter.model(
            inputs_embeds=embeds, position_ids=prefill.position_ids, attention_mask=torch.ones_like(keep)[None]
        ).logits
    assert (pipe.prompt_logits(prefill) - ref).abs().max().item() <= 1e-5


def test_generation_report(tiny_adapter, scene):
    pipe = PrunedVlm(tiny_adapter, PruneConfig(method="gprune", keep=3))
    layout = tiny_adapter.encode_image(pipe.inputs(scene, QUESTION)).layout
    r = pipe.generate(scene, QUESTION, max_new_tokens=3)
    assert r.visual_tokens_kept == 3 + layout.always_keep.numel()
    assert r.visual_tokens_total == layout.num_tokens
    assert r.prefill_tokens == r.prompt_tokens - (r.visual_tokens_total - r.visual_tokens_kept)
    assert 0 < r.flops.prefill_macs_pruned < r.flops.prefill_macs_unpruned
    assert set(r.timings_ms) == {"preprocess", "vision", "prune", "prefill", "decode"}
    assert 1 <= len(r.token_ids) <= 3
