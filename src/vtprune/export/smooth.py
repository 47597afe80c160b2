"""SmoothQuant for ``--weights w8a8``: the decoder's activation outliers moved into its weights, calibrated
on images.

w8a8 graphs quantize every MatMul's activations to int8 with one scale per tensor, computed at run time.
Decoder activations have a few outlier channels, largest at the first prompt rows (pocket VLM, 32 easy-vqa
images: the MLP down projections' inputs reach 100 to 3800 times their median channel), and one scale per
tensor cannot hold them and the rest. SmoothQuant (Xiao et al., 2023) divides
each input channel ``j`` of a linear layer by ``s_j`` and multiplies the weight's input row ``j`` by
``s_j``: the same function in real arithmetic, with the activation range flattened and the difficulty
moved to the weights, which are quantized per output channel. The division is folded into the op that
produces the input, so the graphs gain no op:

- q/k/v projections and gate/up projections: the RMSNorm weight before them (one ``s`` shared by the
  projections reading that norm);
- the down projection: the up projection's output columns (its input ``act(gate) * up`` is linear in up).

``s_j = max|X_j|^alpha / max_i |W_ji|^(1 - alpha)``, ``alpha`` 0.5 at the norms and 0.8 at the down
projections (their outliers are the larger ones). Pocket VLM, G-Prune 64 decoder, 48 easy-vqa prompts
(benchmarks/results/pocket/smoothquant/smoothquant.md, 2-core Xeon, 2026-12-07): next-token KL to fp32
0.07 nats and a 45-ms prefill, against 0.17 nats and 56 ms for w8a8 without smoothing (every down
projection block-wise) and 2.0 nats without smoothing with every down projection dynamic.

Calibration follows STYLE habit 10: a data loader (``prefill_feeds``) yields the decoder's prefill inputs
for calibration images (embeddings after the vision encoder, the pruning stage and the merge; their
position ids); ``activation_ranges`` runs the decoder on each and a recorder keeps every linear layer
input's per-channel absolute maximum. The smoothing is applied to the copy of the model the graphs are
traced from (``smoothed_copy``), so every graph of a bundle (decoder; in-LLM prefill and decode) carries
the same weights; the validation reference is the model as loaded.

Why by hand: ONNX Runtime's ``quantize_static(extra_options={"SmoothQuant": True})`` imports Intel Neural
Compressor's ONNX adaptor, which neural-compressor 3.x no longer ships, and it would smooth each graph
separately with static activation scales; the fold itself is a few multiplications.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vtprune.errors import ConfigError

ALPHA_NORM = 0.5  # q/k/v and gate/up inputs (after an RMSNorm)
ALPHA_DOWN = 0.8  # down-projection inputs
# A down projection whose calibrated input has a channel this many times its median channel keeps block-wise
# int8 activations (``MatMulNBits``) after smoothing: pocket VLM layers 11 and 28 (3757x and 642x; the rest
# <= 135x). Dynamic int8 there too: next-token KL 0.12 instead of 0.07 nats (max 1.15 instead of 0.23) over
# 48 prompts, for a prefill 1 ms shorter (44 against 45 ms).
BLOCKWISE_RATIO = 300.0
MIN_RANGE = 1e-5  # channels never active in calibration keep s near 1 instead of dividing by zero
# Questions asked of the calibration images in turn (the text rows' activations vary with the question: in a
# pocket VLM trial, one fixed prompt gave a next-token KL of 0.11 nats mean / 0.44 max over 48 prompts, the
# images' own questions 0.08 / 0.34); none is an evaluation question.
PROMPTS = ("what shape is in the image ?", "what color is the shape ?", "is there a circle in the image ?",
           "describe the image in detail.", "does the image contain a blue shape ?", "how many shapes are there ?")


@dataclass(frozen=True)
class SmoothGroup:
    """Linear layers reading one activation, and the parameter that produces it (scaled by ``1 / s``)."""

    name: str  # e.g. "layers.3.mlp.down_proj"
    readers: tuple[nn.Linear, ...]
    producer: nn.Parameter  # an RMSNorm weight (D,) or the up projection's weight (I, D)
    alpha: float
    producer_bias: nn.Parameter | None = None  # the up projection's bias, where it has one


def smooth_groups(decoder: nn.Module) -> list[SmoothGroup]:
    """The decoder layers' smoothable groups (Llama / Qwen2 layout: ``input_layernorm`` -> ``self_attn.
    {q,k,v}_proj``, ``post_attention_layernorm`` -> ``mlp.{gate,up}_proj``, ``mlp.up_proj`` -> ``mlp.
    down_proj``); ``ConfigError`` for a decoder of another layout."""
    groups = []
    for i, layer in enumerate(getattr(decoder, "layers", [])):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        needed = [(attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj", "down_proj")),
                  (layer, ("input_layernorm", "post_attention_layernorm"))]  # fmt: skip
        if any(m is None or not all(hasattr(m, a) for a in names) for m, names in needed):
            raise ConfigError(f"SmoothQuant (--weights w8a8, int8-trt) smooths Llama/Qwen2-style decoder layers; "
                              f"layer {i} of this model has another layout (use --weights int8)")  # fmt: skip
        groups += [
            SmoothGroup(f"layers.{i}.self_attn.qkv", (attn.q_proj, attn.k_proj, attn.v_proj),
                        layer.input_layernorm.weight, ALPHA_NORM),
            SmoothGroup(f"layers.{i}.mlp.gate_up", (mlp.gate_proj, mlp.up_proj),
                        layer.post_attention_layernorm.weight, ALPHA_NORM),
            SmoothGroup(f"layers.{i}.mlp.down_proj", (mlp.down_proj,), mlp.up_proj.weight, ALPHA_DOWN,
                        mlp.up_proj.bias),
        ]  # fmt: skip
    if not groups:
        raise ConfigError("SmoothQuant (--weights w8a8, int8-trt): found no decoder layers to smooth "
                          "(use --weights int8)")
    return groups


def prefill_feeds(
    adapter: Any, prune: Any, images: Iterable[Path], prompts: tuple[str, ...] = PROMPTS
) -> Iterator[dict[str, np.ndarray]]:
    """The data loader: per calibration image (asked ``prompts`` in turn), the decoder's prefill inputs as
    the bundle's decoder sees them (``inputs_embeds (1, n, D)``, ``position_ids``), after vision, pruning
    and merge."""
    from vtprune.images import load_image
    from vtprune.runtime.pipeline import PrunedVlm

    pipe = PrunedVlm(adapter, prune)
    for i, path in enumerate(images):
        image = adapter.export_image(load_image(path, adapter.min_image_side))
        pre = pipe.build_prefill(pipe.inputs(image, prompts[i % len(prompts)]))
        yield {"inputs_embeds": pre.embeds.float().cpu().numpy(), "position_ids": pre.position_ids.cpu().numpy()}


@torch.inference_mode()
def activation_ranges(decoder: nn.Module, feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, Tensor]:
    """Per group (``smooth_groups``), each input channel's absolute maximum over every row of ``feeds``."""
    groups = smooth_groups(decoder)
    ranges: dict[str, Tensor] = {}

    def recorder(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).amax(0)
            ranges[name] = torch.maximum(ranges[name], x) if name in ranges else x

        return hook

    handles = [g.readers[0].register_forward_pre_hook(recorder(g.name)) for g in groups]
    seen = 0
    try:
        param = next(decoder.parameters())
        for feed in feeds:
            embeds = torch.from_numpy(feed["inputs_embeds"]).to(param.device, param.dtype)
            positions = torch.from_numpy(feed["position_ids"]).to(param.device)
            decoder(inputs_embeds=embeds, position_ids=positions, use_cache=False)
            seen += 1
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ConfigError("SmoothQuant (--weights w8a8, int8-trt): no calibration images (see --calib-data)")
    return ranges


@torch.no_grad()
def smooth(decoder: nn.Module, ranges: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Fold the SmoothQuant scales of ``ranges`` into ``decoder`` in place; returns what the manifest
    records (alphas, groups, the largest activation range before and after over all groups as a multiple
    of the median channel, and ``blockwise``: the down projections to keep block-wise, ``BLOCKWISE_RATIO``)
    and each group's scales by name."""
    before, after, blockwise, scales = [], [], [], {}
    for g in smooth_groups(decoder):
        x = ranges[g.name].to(g.producer.device, torch.float32).clamp_min(MIN_RANGE)
        w = torch.stack([r.weight.abs().amax(0).float() for r in g.readers]).amax(0).clamp_min(MIN_RANGE)
        s = x.pow(g.alpha) / w.pow(1 - g.alpha)  # (in,)
        scales[g.name] = s
        for r in g.readers:
            r.weight.mul_(s.to(r.weight.dtype))  # nn.Linear weight (out, in): input column j times s_j
        scale = (1 / s).to(g.producer.dtype)
        g.producer.mul_(scale if g.producer.dim() == 1 else scale[:, None])  # norm weight, or up's output rows
        if g.producer_bias is not None:
            g.producer_bias.mul_(scale)
        before.append(float(x.max() / x.median()))
        if g.name.endswith("down_proj") and before[-1] > BLOCKWISE_RATIO:
            blockwise.append(g.name)
        after.append(float((x / s).max() / (x / s).median()))
    return {"method": "smoothquant", "alpha_norm": ALPHA_NORM, "alpha_down": ALPHA_DOWN, "groups": len(before),
            "outlier_ratio_before": round(max(before), 1), "outlier_ratio_after": round(max(after), 1),
            "blockwise": blockwise}, scales  # fmt: skip


def smoothed_copy(adapter: Any, feeds: Iterable[dict[str, np.ndarray]]) -> tuple[Any, dict[str, Any]]:
    """A new adapter around a deep copy of ``adapter``'s model with its decoder smoothed on the activation
    ranges ``adapter``'s own decoder shows on ``feeds``; ``adapter`` is not modified. Returns it and the
    manifest record.

    ALVTS selectors read a layer's normalised input with factors of their own: the copy remembers its
    source and the scales its q/k/v inputs were divided by, and ``runtime.layerwise.selectors_for`` gives
    it the source's selectors rescaled to match (the same scores, the same tokens). FastV, DART and the
    exact selector read that input through the layer's q/k projections, which smoothing keeps exact."""
    ranges = activation_ranges(adapter.decoder, feeds)
    model = copy.deepcopy(adapter.model)
    twin = type(adapter)(model, adapter.processor, adapter.path)
    record, scales = smooth(twin.decoder, ranges)
    twin.smoothed_from = adapter
    twin.selector_input_scales = {i: scales[f"layers.{i}.self_attn.qkv"] for i in range(len(twin.decoder.layers))}
    return twin, record
