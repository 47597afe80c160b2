"""Real-size checkpoints without the hub: the published architectures with seeded random weights.

``write_checkpoint("llava-1.5-7b", out)`` writes a Hugging Face checkpoint directory that ``load_vlm``
reads like a downloaded one: ``config.json`` with the published architecture values (hidden sizes,
layers, heads, vocabulary, vision tower, special-token ids), the published image processor settings, a
word-level stand-in tokenizer whose special tokens sit at the published ids (the real tokenizer files are
not on PyPI), and the weights as safetensors shards with an index.

The model is built on the meta device (no memory), each tensor is drawn on its own (seeded by its name,
so a tensor's values do not depend on shard order) straight in the target dtype, and one shard at a time
is held in memory: the peak is one shard plus the largest tensor, never a model copy. Values follow
transformers' initialisation: normal(0, 0.02) matrices and embeddings, ones for norm weights, zeros
for biases. Such a model produces meaningless text; it has the real shapes, FLOPs, memory and graph
sizes, which is what export, build and latency measurements need.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vtprune.errors import CheckpointError, ConfigError

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INIT_STD = 0.02  # initializer_range of every published config here
SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Published:
    """One published checkpoint: where its values come from and how to build its parts."""

    name: str
    source: str  # the Hugging Face repository whose config.json the values are from
    params: float  # published parameter count in billions (checked against the built model)
    config: Callable[[], Any]
    processor: Callable[[Any], Any]  # tokenizer -> processor (or image processor) to save
    specials: dict[int, str]  # published id -> special token


def _clip_l336() -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )  # fmt: skip


def _vicuna_7b() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=32001,
    )  # fmt: skip


def _llava_1_5_7b() -> Any:
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=_clip_l336(), text_config=_vicuna_7b(), image_token_id=32000, pad_token_id=32001,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=576, tie_word_embeddings=False,
    )  # fmt: skip


PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _llava_next_7b() -> Any:
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        vision_config=_clip_l336(), text_config=_vicuna_7b(), image_token_id=32000, pad_token_id=32001,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=PINPOINTS, image_seq_length=576, use_image_newline_parameter=True,
        tie_word_embeddings=False,
    )  # fmt: skip


def _clip_processor(size: int) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=CLIP_MEAN,
        image_std=CLIP_STD, do_convert_rgb=True,
    )  # fmt: skip


def _llava_processor(tok: Any) -> Any:
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=_clip_processor(336), tokenizer=tok, patch_size=14, image_token="<image>",
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip


def _llava_next_processor(tok: Any) -> Any:
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    image = LlavaNextImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=PINPOINTS,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )  # fmt: skip
    return LlavaNextProcessor(image_processor=image, tokenizer=tok, patch_size=14, image_token="<image>",
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip


QWEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
            "video_token_id": 151656}  # fmt: skip


def _qwen2_5_vl(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, tie: bool) -> Any:
    from transformers import Qwen2_5_VLConfig

    text = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128000, rms_norm_eps=1e-6,
        hidden_act="silu", sliding_window=32768, use_sliding_window=False, max_window_layers=layers,
        bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )  # fmt: skip
    vision = dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3, out_hidden_size=hidden,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, tokens_per_second=2,
        fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
    )  # fmt: skip
    ids = {k: v for k, v in QWEN_IDS.items() if k not in ("bos_token_id", "eos_token_id")}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)


def _qwen_processor(tok: Any) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2,
                                    temporal_patch_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD)  # fmt: skip


LLAVA_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", 32000: "<image>", 32001: "<pad>"}
QWEN_SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151652: "<|vision_start|>",
                 151653: "<|vision_end|>", 151654: "<|vision_pad|>", 151655: "<|image_pad|>",
                 151656: "<|video_pad|>"}  # fmt: skip

PUBLISHED: dict[str, Published] = {
    p.name: p
    for p in (
        Published("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", 7.06, _llava_1_5_7b, _llava_processor, LLAVA_SPECIALS),
        Published("llava-next-7b", "llava-hf/llava-v1.6-vicuna-7b-hf", 7.06, _llava_next_7b, _llava_next_processor,
                  LLAVA_SPECIALS),
        Published("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", 3.75,
                  lambda: _qwen2_5_vl(2048, 11008, 36, 16, 2, 151936, True), _qwen_processor, QWEN_SPECIALS),
        Published("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", 8.29,
                  lambda: _qwen2_5_vl(3584, 18944, 28, 28, 4, 152064, False), _qwen_processor, QWEN_SPECIALS),
    )
}  # fmt: skip


def published(name: str) -> Published:
    if name not in PUBLISHED:
        raise ConfigError(f"--config {name!r}: choose one of {', '.join(PUBLISHED)}")
    return PUBLISHED[name]


def model_class(config: Any) -> type:
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
    )

    classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
               "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}  # fmt: skip
    return classes[config.model_type]


def meta_model(config: Any) -> torch.nn.Module:
    """The model of ``config`` on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return model_class(config)(config)


def tensor_plan(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor the checkpoint holds, as (name, shape): the parameters (tied ones once, as
    ``save_pretrained`` writes them) and the persistent buffers."""
    plan = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    persistent = {n for n, _ in model.named_buffers()} & set(model.state_dict())
    return plan + [(n, tuple(b.shape)) for n, b in model.named_buffers() if n in persistent]


def draw(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The tensor ``name``'s values: ones for 1-D norm weights, zeros for biases, else normal(0, 0.02),
    drawn in row chunks straight into ``dtype`` (no full-size fp32 temporary)."""
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 and name.endswith(".weight"):
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1) if out.dim() else out.view(1)
    step = 1 << 24  # 16 M elements (64 MB of fp32) at a time
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step]
        chunk.copy_(torch.randn(chunk.numel(), generator=gen).mul_(INIT_STD))
    return out


def shards(plan: list[tuple[str, tuple[int, ...]]], itemsize: int, limit: int) -> list[list[tuple[str, tuple]]]:
    """``plan`` cut into consecutive groups of at most ``limit`` bytes (a larger tensor gets its own)."""
    groups: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in plan:
        nbytes = itemsize * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    return groups


def build_tokenizer(specials: dict[int, str], size: int) -> Any:
    """A word-level tokenizer of ``size`` entries: the published special tokens at their ids, the tiny
    models' words next, ``<unused_N>`` filling the rest (so every id the embedding has is a token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vtprune.models.tiny import WORDS

    vocab = {tok: i for i, tok in specials.items()}
    free = (i for i in range(size) if i not in specials)
    for word in WORDS:
        vocab[word] = next(free)
    for i in free:
        vocab[f"<unused_{i}>"] = i
    unk = "<unk>" if "<unk>" in vocab else next(iter(specials.values()))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    named = {"<s>": "bos_token", "</s>": "eos_token", "<pad>": "pad_token", "<unk>": "unk_token",
             "<|im_end|>": "eos_token", "<|endoftext|>": "pad_token"}  # fmt: skip
    roles = {named[t]: t for t in specials.values() if t in named}
    extra = [t for t in specials.values() if t not in named]
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=extra, **roles)


def parameter_count(name: str) -> int:
    model = meta_model(published(name).config())
    return sum(int(torch.Size(shape).numel()) for _, shape in tensor_plan(model))


def write_checkpoint(
    name: str, out: Path, dtype: str = "bf16", seed: int = 0, force: bool = False, shard_bytes: int = SHARD_BYTES,
    overrides: Callable[[Any], Any] | None = None, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Write the published checkpoint ``name`` with seeded random weights into ``out`` (atomically);
    returns a summary (parameters, bytes, shards). ``overrides`` edits the config before the model is
    built (tests shrink the layer counts through it; the result is then not the published model)."""
    from vtprune import outputs

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    spec = published(name)
    config = spec.config()
    if overrides is not None:
        config = overrides(config) or config
    config.dtype = str(DTYPES[dtype]).removeprefix("torch.")
    plan = tensor_plan(meta_model(config))
    itemsize = DTYPES[dtype].itemsize
    total = sum(itemsize * int(torch.Size(s).numel()) for _, s in plan)
    outputs.check_free_space(Path(out), total + (64 << 20), CheckpointError)
    groups = shards(plan, itemsize, shard_bytes)
    with outputs.atomic_dir(Path(out), "checkpoint", force, CheckpointError) as tmp:
        vocab = config.get_text_config().vocab_size
        tok = build_tokenizer(spec.specials, max(vocab, max(spec.specials) + 1))
        config.save_pretrained(tmp)
        spec.processor(tok).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        index = _write_shards(tmp, groups, DTYPES[dtype], seed, total, progress)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        record = {"config": name, "source": spec.source, "dtype": dtype, "seed": seed, "random_weights": True,
                  "parameters": sum(int(torch.Size(s).numel()) for _, s in plan), "bytes": total,
                  "shards": len(groups), "published": overrides is None}  # fmt: skip
        (tmp / "vtprune_checkpoint.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def _write_shards(tmp: Path, groups: list, dtype: torch.dtype, seed: int, total: int, progress: bool) -> dict:
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    with _bar(total, progress) as bar:
        for i, group in enumerate(groups, 1):
            file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            tensors = {}
            for tensor_name, shape in group:
                tensors[tensor_name] = draw(tensor_name, shape, dtype, seed)
                bar.update(tensors[tensor_name].nbytes)
                weight_map[tensor_name] = file
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            os.chmod(tmp / file, 0o644)  # safetensors creates its files private
            del tensors  # one shard in memory at a time
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


def _bar(total: int, enabled: bool) -> Any:
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="weights", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)  # fmt: skip
