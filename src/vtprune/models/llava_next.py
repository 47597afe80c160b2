"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres grid, base view + unpadded high-res crops,
one ``image_newline`` token after each high-res row. G-Prune prunes base and high-res separately and
keeps every newline token (ALGORITHMS.md §1.2, §1.5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vtprune.errors import InternalError
from vtprune.models import register_adapter
from vtprune.models.base import VisualTokens, VlmAdapter
from vtprune.prune import VisualLayout


@register_adapter
class LlavaNextAdapter(VlmAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    hf_class = "LlavaNextForConditionalGeneration"
    image_slot = "<image>"

    @classmethod
    def load_processor(cls, path: Path) -> Any:
        from transformers import LlavaNextProcessor

        return LlavaNextProcessor.from_pretrained(str(path), local_files_only=True)

    def default_prompt(self, question: str) -> str:
        return f"USER: {self.image_slot}\n{question} ASSISTANT:"

    def prepare(self, image: Any, prompt: str) -> dict[str, Tensor]:
        return dict(self.processor(images=image, text=prompt, return_tensors="pt"))

    def encode_image(self, inputs: dict[str, Tensor]) -> VisualTokens:
        pixels, sizes = inputs["pixel_values"].to(self.model.dtype), inputs["image_sizes"]
        feats = self.model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        embeds = torch.stack(list(feats))  # (B, N_v, D): base, then hr rows each ending in a newline
        return VisualTokens(embeds, self.layout(sizes[0], embeds.shape[1]))

    def layout(self, image_size: Tensor, num_tokens: int) -> VisualLayout:
        """Where base, high-res and newline tokens sit, found by packing index codes with the model's
        own ``pack_image_features`` (so unpadding and newline placement match it exactly)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        per_crop = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        crops = image_size_to_num_patches(image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        codes = torch.arange(crops * per_crop, dtype=torch.float32).view(crops, per_crop, 1)
        packed, _ = self.model.model.pack_image_features(
            [codes], image_size[None], cfg.vision_feature_select_strategy, image_newline=torch.tensor([-1.0])
        )
        code = packed[0][:, 0]  # (N_v,) crop-token code per position, -1 for newline
        if code.numel() != num_tokens:
            raise InternalError(f"layout has {code.numel()} tokens, features have {num_tokens}")
        pos = torch.arange(code.numel())
        base, hr = pos[(code >= 0) & (code < per_crop)], pos[code >= per_crop]
        if not hr.numel():  # the image used the base view only
            return VisualLayout(code.numel(), (base,), pos[code < 0], ("base",))
        caps = (per_crop, self.max_grid()[0] * self.max_grid()[1])
        return VisualLayout(code.numel(), (base, hr), pos[code < 0], ("base", "hr"), caps)

    def max_grid(self) -> tuple[int, int]:
        """(rows, cols) of the largest high-res token grid any pinpoint resolution gives."""
        cfg = self.model.config
        side, per_side = cfg.vision_config.image_size, cfg.vision_config.image_size // cfg.vision_config.patch_size
        grids = [((h // side) * per_side, (w // side) * per_side) for h, w in cfg.image_grid_pinpoints]
        return max(grids, key=lambda g: (g[0] * g[1], g[0]))
