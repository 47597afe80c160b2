"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres grid, base view + unpadded high-res crops,
one ``image_newline`` token after each high-res row. G-Prune prunes base and high-res separately and
keeps every newline token (ALGORITHMS.md §1.2, §1.5)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vtprune.errors import InternalError
from vtprune.models import register_adapter
from vtprune.models.base import VisualTokens
from vtprune.models.llava import LlavaAdapter, clip_projector_features
from vtprune.prune import VisualLayout


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    """Prompt handling as LLaVA-1.5; the anyres visual layout is its own."""

    family = "llava_next"
    model_types = ("llava_next",)
    hf_class = "LlavaNextForConditionalGeneration"

    @classmethod
    def load_processor(cls, path: Path) -> Any:
        from transformers import LlavaNextProcessor

        return LlavaNextProcessor.from_pretrained(str(path), local_files_only=True)

    @property
    def encoder_refusal(self) -> str | None:
        # Each crop has its own [CLS] row; ranking the union of crops, and VisionZip's merge across the
        # unpadded, stitched high-res grid (and the static-shape graph's padded crops), is not built yet.
        return "VisionZip is not implemented for LLaVA-NeXT's multi-crop (anyres) layout yet"

    def encode_image(self, inputs: dict[str, Tensor]) -> VisualTokens:
        pixels, sizes = inputs["pixel_values"].to(self.model.dtype), inputs["image_sizes"]
        feats = self.model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        embeds = torch.stack(list(feats))  # (B, N_v, D): base, then hr rows each ending in a newline
        return VisualTokens(embeds, self.layout(sizes[0], embeds.shape[1]))

    def vision_features(self, pixel_values: Tensor) -> Tensor:
        """Projector output of every crop: (B, P, 3, s, s) -> (B, P * per_crop, D), crop-major."""
        b, p = pixel_values.shape[:2]
        flat = clip_projector_features(self.model.model, self.config, pixel_values.flatten(0, 1))  # (B*P, n, D)
        return flat.reshape(b, p * flat.shape[1], flat.shape[2])

    def layout(self, image_size: Tensor, num_tokens: int) -> VisualLayout:
        """Where base, high-res and newline tokens sit in the packed sequence (see ``packed_codes``)."""
        code = packed_codes(self.config, image_size)  # (N_v,)
        if code.numel() != num_tokens:
            raise InternalError(f"layout has {code.numel()} tokens, features have {num_tokens}")
        per_crop = (self.config.vision_config.image_size // self.config.vision_config.patch_size) ** 2
        pos = torch.arange(code.numel())
        base, hr = pos[(code >= 0) & (code < per_crop)], pos[code >= per_crop]
        if not hr.numel():  # the image used the base view only
            side = math.isqrt(per_crop)
            return VisualLayout(code.numel(), (base,), pos[code < 0], ("base",), grids=((side, side),))
        rows, cols = max_grid(self.config)
        side = math.isqrt(per_crop)
        hr_rows = int((code < 0).sum())  # one newline token ends each row of the unpadded high-res grid
        grids = ((side, side), (hr_rows, hr.numel() // hr_rows) if hr_rows else None)
        return VisualLayout(code.numel(), (base, hr), pos[code < 0], ("base", "hr"), (per_crop, rows * cols), grids)


def max_grid(config: Any) -> tuple[int, int]:
    """(rows, cols) of the largest high-res token grid any pinpoint resolution gives."""
    side = config.vision_config.image_size
    per_side = side // config.vision_config.patch_size
    grids = [((h // side) * per_side, (w // side) * per_side) for h, w in config.image_grid_pinpoints]
    return max(grids, key=lambda g: (g[0] * g[1], g[0]))


def packed_codes(config: Any, image_size: Tensor) -> Tensor:
    """For each position of LLaVA-NeXT's packed visual sequence, the flat index (crop * per_crop + patch)
    of the vision feature it holds, or -1 for an ``image_newline`` token.

    Mirrors ``LlavaNextModel.pack_image_features``: base crop first, then the high-res crops stitched into
    one grid, unpadded to the image's aspect ratio, with a newline after each row.
    """
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    side = config.vision_config.image_size
    per_side = side // config.vision_config.patch_size
    crops = image_size_to_num_patches(image_size, config.image_grid_pinpoints, side)
    codes = torch.arange(crops * per_side * per_side)
    base = codes[: per_side * per_side]
    if crops == 1:
        return torch.cat([base, torch.tensor([-1])])
    gh, gw = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, side)
    hr = codes[per_side * per_side :].view(gh, gw, per_side, per_side).permute(0, 2, 1, 3)  # (gh, h, gw, w)
    hr = unpad_image(hr.reshape(1, gh * per_side, gw * per_side), image_size)[0]  # (rows, cols)
    hr = torch.cat([hr, torch.full((hr.shape[0], 1), -1)], dim=1)  # newline closes each row
    return torch.cat([base, hr.flatten()])
