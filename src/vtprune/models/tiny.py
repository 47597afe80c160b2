"""Tiny random-weight checkpoints of every supported family, for tests and the offline demo.

Each is built from a config with a fixed seed, saved as a real checkpoint directory (safetensors,
tokenizer, processor files) and then loaded through exactly the code path a user's checkpoint takes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from vtprune import outputs
from vtprune.errors import CheckpointError, ConfigError

SPECIALS = [
    "<unk>", "<pad>", "<s>", "</s>", "<image>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
    "<|vision_end|>", "<|im_start|>", "<|im_end|>",
]  # fmt: skip
WORDS = (
    "USER ASSISTANT system user assistant You are a helpful . : ? , ! describe the image what is in this "
    "color shape of there does contain circle rectangle triangle red green blue yellow black white gray "
    "brown teal yes no left right top bottom one two three how many see do you cat dog object photo"
).split()
SEED = 0


def build_tokenizer():
    """A WordLevel tokenizer with the special tokens all three families need (no hub, no files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIALS[4:],
    )  # fmt: skip


def _llama_text(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=3, bos_token_id=2, pad_token_id=1,
    )  # fmt: skip


def _clip_vision(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        image_size=image_size, patch_size=14, projection_dim=64,
    )  # fmt: skip


def _save_llava(out: Path) -> None:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = build_tokenizer()
    cfg = LlavaConfig(
        vision_config=_clip_vision(112), text_config=_llama_text(len(tok)), image_seq_length=64,
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    image_proc = CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    proc = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=14, image_token="<image>",
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    LlavaForConditionalGeneration(cfg).save_pretrained(out)
    proc.save_pretrained(out)


def _save_llava_next(out: Path) -> None:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = build_tokenizer()
    pinpoints = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]
    cfg = LlavaNextConfig(
        vision_config=_clip_vision(56), text_config=_llama_text(len(tok)), image_grid_pinpoints=pinpoints,
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    image_proc = LlavaNextImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_grid_pinpoints=pinpoints
    )
    proc = LlavaNextProcessor(image_processor=image_proc, tokenizer=tok, patch_size=14, image_token="<image>",
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    LlavaNextForConditionalGeneration(cfg).save_pretrained(out)
    proc.save_pretrained(out)


def _save_qwen2_5_vl(out: Path) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}  # fmt: skip
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=3, pad_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
    )  # fmt: skip
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                  window_size=56, fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    image_proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(out)
    image_proc.save_pretrained(out)
    tok.save_pretrained(out)


TINY_MODELS: dict[str, Callable[[Path], None]] = {
    "tiny-llava": _save_llava,
    "tiny-llava-next": _save_llava_next,
    "tiny-qwen2.5-vl": _save_qwen2_5_vl,
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vtprune"


def materialize(name: str, cache_dir: Path | None = None) -> Path:
    """Write tiny model ``name`` to ``<cache>/tiny/<name>`` once (atomically) and return the directory."""
    if name not in TINY_MODELS:
        raise ConfigError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    final = (cache_dir or default_cache_dir()) / "tiny" / name
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with outputs.locked(final, CheckpointError, wait=True):  # a concurrent run may have written it meanwhile
        if (final / "config.json").is_file():
            return final
        with outputs.atomic_dir(final, "model", True, CheckpointError, lock=False) as tmp:
            torch.manual_seed(SEED)
            TINY_MODELS[name](tmp)
    return final
