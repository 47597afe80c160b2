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
        pixels = inputs["pixel_values"].to(self.model.dtype)
        feats = self.model.model.get_image_features(pixel_values=pixels).pooler_output
        embeds = torch.stack(list(feats))  # (B, N_v, D) projector output, CLS already dropped
        return VisualTokens(embeds, single_group(embeds.shape[1]))
