"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, CLS dropped, MLP projector, one group.

Also the vision-encoder seam of encoder methods (VisionZip) for LLaVA-style towers with a [CLS] token
(CLIP; DINOv2 in the pocket VLM): the feature layer's input is read from the tower's hidden states and
that layer's own norm and q/k projections recompute the CLS attention row and the keys, so the tower
keeps its fused attention and nothing is patched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vtprune.errors import UnsupportedModelError
from vtprune.models import register_adapter
from vtprune.models.base import EncoderTokens, VisualTokens, VlmAdapter
from vtprune.prune import VisualLayout, visionzip

# Per vision-tower model_type: where its layers live, and in a layer, the pre-attention norm and the
# attention module (which holds q_proj / k_proj). Both towers put [CLS] at index 0.
VISION_TOWERS: dict[str, tuple[str, str, str]] = {
    "clip_vision_model": ("encoder.layers", "layer_norm1", "self_attn"),
    "dinov2": ("encoder.layer", "norm1", "attention"),
}


def single_group(n: int, name: str = "image", grid: tuple[int, int] | None = None) -> VisualLayout:
    """Layout of an image whose N visual tokens form one prunable group (an (h, w) grid, raster order;
    None: a square one)."""
    return VisualLayout(n, (torch.arange(n),), torch.zeros(0, dtype=torch.long), (name,),
                        grids=None if grid is None else (grid,))  # fmt: skip


@register_adapter
class LlavaAdapter(VlmAdapter):
    family = "llava"
    model_types = ("llava",)
    hf_class = "LlavaForConditionalGeneration"
    image_slot = "<image>"

    @classmethod
    def load_processor(cls, path: Path) -> Any:
        from transformers import LlavaProcessor

        return LlavaProcessor.from_pretrained(str(path), local_files_only=True)

    def default_prompt(self, question: str) -> str:
        return f"USER: {self.image_slot}\n{question} ASSISTANT:"

    def prepare(self, image: Any, prompt: str) -> dict[str, Tensor]:
        return dict(self.processor(images=image, text=prompt, return_tensors="pt"))

    def encode_image(self, inputs: dict[str, Tensor]) -> VisualTokens:
        embeds = self.vision_features(inputs["pixel_values"].to(self.model.dtype))  # (B, N_v, D)
        return VisualTokens(embeds, single_group(embeds.shape[1]))

    def vision_features(self, pixel_values: Tensor) -> Tensor:
        """Projector output (B, N, D) of images (B, 3, H, W); traceable (no per-image Python lists)."""
        return clip_projector_features(self.model.model, self.config, pixel_values)

    @property
    def encoder_refusal(self) -> str | None:
        return cls_tower_refusal(self.config)

    def encoder_tokens(self, inputs: dict[str, Tensor]) -> EncoderTokens:
        features, evidence = self.encoder_evidence(inputs["pixel_values"].to(self.model.dtype))
        return EncoderTokens(features, evidence, single_group(features.shape[1]))

    def encoder_evidence(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) -> pre-projector features (B, N, C), evidence (B, N, 1 + hd); traceable."""
        return cls_tower_evidence(self.model.model, self.config, pixel_values)

    def project(self, features: Tensor) -> Tensor:
        return self.model.model.multi_modal_projector(features)


def clip_projector_features(model: Any, config: Any, pixel_values: Tensor) -> Tensor:
    """Vision tower hidden state(s) at ``vision_feature_layer``, CLS dropped for the default strategy,
    then the multimodal projector: (B, 3, H, W) -> (B, N, D). Same as ``get_image_features``."""
    out = model.vision_tower(pixel_values, output_hidden_states=True)
    layer = config.vision_feature_layer
    layers = layer if isinstance(layer, (list, tuple)) else [layer]
    hidden = torch.cat([out.hidden_states[i] for i in layers], dim=-1)  # (B, 1 + N, C)
    if config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    return model.multi_modal_projector(hidden)


def cls_tower_refusal(config: Any) -> str | None:
    """Why VisionZip cannot read this LLaVA checkpoint's tower, or None when it can."""
    tower = config.vision_config.model_type
    if tower not in VISION_TOWERS:
        return f"its {tower!r} vision tower is not one vtprune knows the [CLS] layout of ({', '.join(VISION_TOWERS)})"
    if isinstance(config.vision_feature_layer, (list, tuple)):
        return "it concatenates several vision feature layers (vision_feature_layer is a list)"
    if config.vision_feature_select_strategy != "default":
        return "its vision_feature_select_strategy keeps [CLS] as a visual token (only 'default' is supported)"
    layers = config.vision_config.num_hidden_layers
    if feature_layer_index(config.vision_feature_layer, layers) not in range(1, layers + 1):
        return f"vision_feature_layer={config.vision_feature_layer} is not the output of one of its {layers} layers"
    return None


def feature_layer_index(layer: int, num_layers: int) -> int:
    """Index into the tower's ``hidden_states`` (embeddings at 0, layer i's output at i + 1)."""
    return layer if layer >= 0 else num_layers + 1 + layer


def cls_tower_evidence(model: Any, config: Any, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
    """The feature layer's output without CLS (B, N, C), and VisionZip's evidence (B, N, 1 + hd): the CLS
    attention row of that layer summed over heads and the layer's head-averaged keys, both recomputed
    from the layer's own norm and q/k projections applied to its input hidden states."""
    refusal = cls_tower_refusal(config)
    if refusal is not None:
        raise UnsupportedModelError(f"VisionZip cannot read this vision tower: {refusal}")
    path, norm_name, attn_name = VISION_TOWERS[config.vision_config.model_type]
    out = model.vision_tower(pixel_values, output_hidden_states=True)
    p = feature_layer_index(config.vision_feature_layer, config.vision_config.num_hidden_layers)
    layer = model.vision_tower.get_submodule(path)[p - 1]  # produces hidden_states[p]
    attn = getattr(layer, attn_name)
    x = getattr(layer, norm_name)(out.hidden_states[p - 1])  # (B, 1 + N, C) the layer's attention input
    heads = config.vision_config.num_attention_heads
    q = attn.q_proj(x[:, :1]).unflatten(-1, (heads, -1)).squeeze(1)  # (B, H, hd) CLS query
    k = attn.k_proj(x).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, 1 + N, hd)
    cls_attn = visionzip.cls_attention(q, k, k.shape[-1] ** -0.5)[:, 1:]  # (B, N) patches only
    return out.hidden_states[p][:, 1:], visionzip.evidence(cls_attn, k[:, :, 1:])
