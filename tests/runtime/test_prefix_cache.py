"""The ONNX Runtime runner's prefix cache: the keys and values of the prompt's text before the image are
kept for the next prompt that begins with the same tokens, and answers stay those of the whole prompt."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import FAMILIES
from vtprune.backends.ort import OrtVlm

PROMPT = "what is in the image?"


def other_image(scene: Image.Image) -> Image.Image:
    return Image.fromarray(255 - np.asarray(scene))  # another image, same size


def decided(whole: OrtVlm, image: Image.Image, tokens: int, prompt: str = PROMPT, tie: float = 1e-3) -> list[int]:
    """``whole``'s greedy tokens up to the first step whose two best logits lie within ``tie`` (where
    another CPU's rounding, or the split prefill's, may pick the other one)."""
    record = whole.prefill_inputs(whole.inputs(image, prompt), whole.timer())
    logits, state = whole.first_logits(record)
    out, position = [], whole.next_position(record)
    for i in range(tokens):
        top = np.sort(logits)[-2:]
        if top[1] - top[0] < tie:
            break
        out.append(int(np.argmax(logits)))
        logits, state = whole.next_logits(out[-1], position + i, state)
    return out


def first_logits(vlm: OrtVlm, image: Image.Image, prompt: str, raw: bool = False) -> tuple[np.ndarray, dict]:
    record = vlm.prefill_inputs(vlm.inputs(image, prompt, raw), vlm.timer())
    logits, _ = vlm.first_logits(record)
    return logits, record


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_prompts_after_the_first_reuse_the_text_before_the_image(bundles, scene, name):
    cached, whole = OrtVlm(bundles[name]), OrtVlm(bundles[name], prefix_cache=False)
    for i, image in enumerate([scene, other_image(scene), scene]):
        got, record = first_logits(cached, image, PROMPT)
        want, _ = first_logits(whole, image, PROMPT)
        assert 0 < record["prefix_len"] < record["embeds"].shape[1]
        assert record["prefix_cached"] == (0 if i == 0 else record["prefix_len"])
        assert np.abs(got - want).max() < 1e-4
        a = cached.generate(image, PROMPT, max_new_tokens=6)
        want_tokens = decided(whole, image, 6)
        assert want_tokens and a.token_ids[: len(want_tokens)] == want_tokens  # (the first logits: above)
        assert a.cached_tokens == record["prefix_len"]


def test_another_text_before_the_image_is_prefilled_again(bundles, scene):
    vlm, whole = OrtVlm(bundles["tiny-llava"]), OrtVlm(bundles["tiny-llava"], prefix_cache=False)
    for prompt in ("USER: <image>\nwhat? ASSISTANT:", "USER: look <image>\nwhat? ASSISTANT:"):
        got, record = first_logits(vlm, scene, prompt, raw=True)
        assert record["prefix_cached"] == 0  # the second prefix differs from the first
        assert np.abs(got - first_logits(whole, scene, prompt, raw=True)[0]).max() < 1e-4
    _, record = first_logits(vlm, scene, "USER: look <image>\ncolour? ASSISTANT:", raw=True)
    assert record["prefix_cached"] == record["prefix_len"]


def test_an_in_llm_bundle_takes_the_prompt_whole(tmp_path, cache_dir, scene):
    from vtprune.api import export_bundle
    from vtprune.config import PruneConfig
    from vtprune.export.bundle import ExportConfig

    out = tmp_path / "fastv"
    cfg = PruneConfig(method="fastv", keep=16, layer=1)
    export_bundle("tiny-llava", cfg, ExportConfig(validate=False), out, cache_dir)
    vlm = OrtVlm(out)
    assert not vlm.prefix_cache  # its routed prefill graph reads every row of the prompt
    assert [vlm.generate(scene, PROMPT, max_new_tokens=2).cached_tokens for _ in range(2)] == [0, 0]
