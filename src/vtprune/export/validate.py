"""Validation that runs on every export: the bundle in ONNX Runtime against the PyTorch reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtprune.config import PruneConfig
from vtprune.errors import AccuracyError

ATOL = {"embeds": 1e-4, "logits": 1e-3}
GREEDY_STEPS = 32


def validate_bundle(adapter: Any, cfg: PruneConfig, bundle: Path, image: Any, prompt: str) -> dict[str, Any]:
    """Compare a freshly written bundle with the PyTorch pipeline on one image and prompt.

    Checks identical prompt tokens, kept visual indices and position ids; max abs diff of the decoder's
    input embeddings and of the prefill logits; and identical greedy tokens for 32 steps (EOS ignored).
    Raises ``AccuracyError`` with a per-check table on any failure; returns the table otherwise.
    """
    from vtprune.runtime.ort import OrtVlm
    from vtprune.runtime.pipeline import PrunedVlm
    from vtprune.runtime.timing import StageTimer

    ref, bun = PrunedVlm(adapter, cfg), OrtVlm(bundle, verify=False)
    image = bun._fit_image(image)
    ref_in, bun_in = ref.inputs(image, prompt), bun.inputs(image, prompt)
    ref_pre, bun_pre = ref.build_prefill(ref_in), bun.prefill_inputs(bun_in, StageTimer())
    rows = [_exact("prompt token ids", ref_in["input_ids"].numpy(), bun_in["input_ids"].numpy()),
            _exact("kept visual indices", ref_pre.visual_keep[0].numpy(), bun_pre["keep_idx"]),
            _exact("position ids", ref_pre.position_ids.numpy(), bun_pre["positions"])]  # fmt: skip
    if all(r["ok"] for r in rows):
        rows.append(_close("decoder input embeds", ref_pre.embeds.numpy(), bun_pre["embeds"], ATOL["embeds"]))
        ref_logits = ref.prompt_logits(ref_pre)[:, -1].numpy()
        bun_logits, _ = bun.decoder_step(bun_pre["embeds"], bun_pre["positions"], bun._empty_past())
        rows.append(_close("prefill logits", ref_logits, bun_logits, ATOL["logits"]))
        with torch.inference_mode():
            ref_tokens = ref.decode(ref_pre, GREEDY_STEPS, eos=set())
        bun_tokens = bun.decode(bun_pre, GREEDY_STEPS, StageTimer(), eos=set())
        rows.append(_exact(f"greedy tokens ({GREEDY_STEPS} steps)", np.array(ref_tokens), np.array(bun_tokens)))
    if not all(r["ok"] for r in rows):
        failed = ", ".join(r["check"] for r in rows if not r["ok"])
        raise AccuracyError(f"exported bundle disagrees with PyTorch on: {failed}; no bundle was written", rows)
    return {"image_size": list(image.size), "prompt": prompt, "checks": rows}


def _exact(name: str, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    ok = a.shape == b.shape and bool(np.array_equal(a, b))
    return {"check": name, "ok": ok, "mismatches": None if a.shape != b.shape else int((a != b).sum())}


def _close(name: str, a: np.ndarray, b: np.ndarray, atol: float) -> dict[str, Any]:
    diff = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
    return {"check": name, "ok": diff <= atol, "max_abs_diff": diff, "atol": atol}
