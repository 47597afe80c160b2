"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): native dynamic resolution, 2x2 patch merger,
M-RoPE (temporal, height, width) position ids. Pruning acts on the merger output; kept tokens keep
their unpruned M-RoPE ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vtprune.models import register_adapter
from vtprune.models.base import VisualTokens, VlmAdapter
from vtprune.models.llava import single_group


@dataclass
class QwenVLProcessor:
    """Image processor + tokenizer, without the video processor.

    ``Qwen2_5_VLProcessor`` builds a video processor that needs torchvision, which cannot be installed
    next to the CPU torch here (PLATFORM.md §4); images need only these two parts.
    """

    image_processor: Any
    tokenizer: Any
    image_token: str = "<|image_pad|>"

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@register_adapter
class Qwen25VLAdapter(VlmAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    hf_class = "Qwen2_5_VLForConditionalGeneration"
    image_slot = "<|image_pad|>"
    required_config_keys = ("vision_config",)  # older checkpoints keep text fields at the top level

    @property
    def encoder_refusal(self) -> str | None:
        return "Qwen2.5-VL's vision tower has no [CLS] token, whose attention VisionZip ranks patches by"

    @classmethod
    def load_processor(cls, path: Path) -> Any:
        from transformers import AutoImageProcessor, AutoTokenizer

        image_processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        return QwenVLProcessor(image_processor, tokenizer)

    def default_prompt(self, question: str) -> str:
        return (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|>{self.image_slot}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
        )

    @property
    def min_image_side(self) -> int:
        return self.patch_size * int(self.config.vision_config.spatial_merge_size)

    def prepare(self, image: Any, prompt: str) -> dict[str, Tensor]:
        vision = self.processor.image_processor(images=[image], return_tensors="pt")
        grid = vision["image_grid_thw"]  # (1, 3): t, h, w in patches
        merge = int(self.config.vision_config.spatial_merge_size)
        n_tokens = int(grid[0].prod()) // merge**2
        text = prompt.replace(self.image_slot, self.image_slot * n_tokens)
        enc = self.tokenizer(text, return_tensors="pt")
        type_ids = (enc["input_ids"] == self.image_token_id).to(torch.int32)  # 1 = image, 0 = text
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": grid,
            "mm_token_type_ids": type_ids,
        }

    def encode_image(self, inputs: dict[str, Tensor]) -> VisualTokens:
        pixels = inputs["pixel_values"].to(self.model.dtype)
        feats = self.model.model.get_image_features(pixels, inputs["image_grid_thw"]).pooler_output
        embeds = torch.stack(list(feats))  # (B, N_v, D) merger output, one row per 2x2 patch block
        return VisualTokens(embeds, single_group(embeds.shape[1], grid=self.merged_grid(inputs["image_grid_thw"])))

    def merged_grid(self, grid_thw: Tensor) -> tuple[int, int]:
        """(h, w) of the merger's output grid for one image (raster order over the 2x2-merged patches)."""
        t, h, w = (int(v) for v in grid_thw.reshape(-1, 3)[0])
        m = self.config.vision_config.spatial_merge_size
        return t * h // m, w // m

    def fp32_islands(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        visual = model.model.visual
        return {"vision last block": visual.blocks[-1], "vision patch merger": visual.merger}

    def export_image(self, image: Any) -> Any:
        """Qwen2.5-VL graphs are fixed to one grid: 448x448 px (the processor may cap the pixel count)."""
        return image.resize((448, 448))

    def position_ids(self, inputs: dict[str, Tensor]) -> Tensor:
        """M-RoPE ids (3, B, L) of the unpruned prompt (same rule as the model's ``get_rope_index``)."""
        merge = int(self.config.vision_config.spatial_merge_size)
        return mrope_position_ids(inputs["input_ids"], self.image_token_id, inputs["image_grid_thw"], merge)


def mrope_position_ids(input_ids: Tensor, image_token_id: int, grid_thw: Tensor, merge: int) -> Tensor:
    """M-RoPE (temporal, height, width) ids for prompts with still images: (B, L) -> (3, B, L).

    Text advances all three axes by one per token. An image block of (t, h, w) patches starts at the
    current position p: ids (p + t_i, p + h_i, p + w_i) over the merged grid; afterwards text resumes
    at p + max(h, w) / merge. Images are consumed from ``grid_thw`` in order across the batch.
    """
    out = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    grids = iter(grid_thw.tolist())
    for b, row in enumerate(input_ids.tolist()):
        pos, i = 0, 0
        while i < len(row):
            if row[i] != image_token_id:
                out[:, b, i] = pos
                pos, i = pos + 1, i + 1
                continue
            t, h, w = next(grids)
            gt, gh, gw = t, h // merge, w // merge
            ids = torch.stack(torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij"))
            out[:, b, i : i + gt * gh * gw] = ids.reshape(3, -1) + pos  # (3, t*h*w) row-major over (t, h, w)
            pos, i = pos + max(gh, gw), i + gt * gh * gw
    return out
