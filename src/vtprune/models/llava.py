"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, CLS dropped, MLP projector, one group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vtprune.models import register_adapter
from vtprune.models.base import VisualTokens, VlmAdapter
from vtprune.prune import VisualLayout


def single_group(n: int, name: str = "image") -> VisualLayout:
    """Layout of an image whose N visual tokens form one prunable group."""
    return VisualLayout(n, (torch.arange(n),), torch.zeros(0, dtype=torch.long), (name,))


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
