"""A toy VLM family, written the way a plug-in adds one: this single module registers the adapter (how to
load, prompt and encode) and its vision export (how to trace and feed the graph). It is a LLaVA-1.5
checkpoint under its own ``model_type`` with its own prompt. tests/test_registries.py imports it in a fresh
process, so the families the rest of the suite sees are untouched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vtprune.export.vision import LlavaVision, VisionExport, register_vision_export
from vtprune.models import register_adapter
from vtprune.models.llava import LlavaAdapter

FAMILY = "toy_llava"


@register_adapter
class ToyAdapter(LlavaAdapter):
    family = FAMILY
    model_types = (FAMILY,)

    def default_prompt(self, question: str) -> str:
        return f"USER: {self.image_slot}\nplease answer : {question} ASSISTANT:"


def _vision_spec(adapter: Any, cfg: Any, sample: dict[str, torch.Tensor]) -> dict[str, Any]:
    pixels = sample["pixel_values"].repeat(2, 1, 1, 1)  # batch 2 so the batch axis stays symbolic
    n = adapter.vision_features(pixels[:1]).shape[1]
    return {"module": LlavaVision(adapter, cfg, n), "args": (pixels,), "inputs": ["pixel_values"],
            "dynamic": {"pixel_values": {0: torch.export.Dim.DYNAMIC}}, "meta": {"num_tokens": n}}  # fmt: skip


register_vision_export(FAMILY, VisionExport(_vision_spec))


def write_checkpoint(llava_dir: Path, out: Path) -> Path:
    """A toy checkpoint: the tiny LLaVA's files under this family's model_type, its weights saved under the
    model's own parameter names (transformers renames legacy LLaVA keys only for model_type llava)."""
    from safetensors.torch import save_model
    from transformers import LlavaForConditionalGeneration

    out.mkdir(parents=True)
    for f in llava_dir.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    save_model(LlavaForConditionalGeneration.from_pretrained(str(llava_dir)), str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg | {"model_type": FAMILY}))
    return out
