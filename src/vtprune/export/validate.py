"""Parity between backends: the bundle in ONNX Runtime against the PyTorch reference.

``compare_backends`` measures (identical prompt tokens and position ids; kept-index IoU; max abs diff and
cosine similarity of the decoder's input embeddings and of the prefill logits; greedy-token agreement).
``validate_bundle`` runs it on every export with strict fp32 tolerances; ``vtprune check`` reports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtprune.config import PruneConfig
from vtprune.errors import AccuracyError

ATOL = {"embeds": 1e-4, "logits": 1e-3}
GREEDY_STEPS = 32


def compare_backends(adapter: Any, cfg: PruneConfig, bundle: Path, image: Any, prompt: str, steps: int) -> list:
    """Rows of metrics comparing PyTorch (``adapter`` + ``cfg``) with ONNX Runtime (``bundle``)."""
    from vtprune.runtime.ort import OrtVlm
    from vtprune.runtime.pipeline import PrunedVlm
    from vtprune.runtime.timing import StageTimer

    ref, bun = PrunedVlm(adapter, cfg), OrtVlm(bundle, verify=False)
    image = bun._fit_image(image)
    ref_in, bun_in = ref.inputs(image, prompt), bun.inputs(image, prompt)
    ref_pre, bun_pre = ref.build_prefill(ref_in), bun.prefill_inputs(bun_in, StageTimer())
    ref_keep = ref_pre.visual_keep[0].numpy()
    rows = [_exact("prompt token ids", ref_in["input_ids"].numpy(), bun_in["input_ids"].numpy()),
            _exact("kept visual indices", ref_keep, bun_pre["keep_idx"]) | {"iou": iou(ref_keep, bun_pre["keep_idx"])},
            _exact("position ids", ref_pre.position_ids.numpy(), bun_pre["positions"])]  # fmt: skip
    if not all(r["ok"] for r in rows):
        return rows
    rows.append(_close("decoder input embeds", ref_pre.embeds.numpy(), bun_pre["embeds"], ATOL["embeds"]))
    ref_logits = ref.prompt_logits(ref_pre)[:, -1].numpy()
    bun_logits, _ = bun.decoder_step(bun_pre["embeds"], bun_pre["positions"], bun._empty_past())
    rows.append(_close("prefill logits", ref_logits, bun_logits, ATOL["logits"]))
    with torch.inference_mode():
        ref_tokens = ref.decode(ref_pre, steps, eos=set())
    bun_tokens = bun.decode(bun_pre, steps, StageTimer(), eos=set())
    rows.append(_exact(f"greedy tokens ({steps} steps)", np.array(ref_tokens), np.array(bun_tokens))
                | {"agreement": float(np.mean(np.array(ref_tokens) == np.array(bun_tokens)))})  # fmt: skip
    return rows


def validate_bundle(adapter: Any, cfg: PruneConfig, bundle: Path, image: Any, prompt: str) -> dict[str, Any]:
    """Strict fp32 check run on every export; raises ``AccuracyError`` with the table on any failure."""
    rows = compare_backends(adapter, cfg, bundle, image, prompt, GREEDY_STEPS)
    if not all(r["ok"] for r in rows):
        failed = ", ".join(r["check"] for r in rows if not r["ok"])
        raise AccuracyError(f"exported bundle disagrees with PyTorch on: {failed}; no bundle was written", rows)
    return {"image_size": list(image.size), "prompt": prompt, "checks": rows}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two index sets (1.0 when both are empty)."""
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def _exact(name: str, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    ok = a.shape == b.shape and bool(np.array_equal(a, b))
    return {"check": name, "ok": ok, "mismatches": None if a.shape != b.shape else int((a != b).sum())}


def _close(name: str, a: np.ndarray, b: np.ndarray, atol: float) -> dict[str, Any]:
    if a.shape != b.shape:
        return {"check": name, "ok": False, "max_abs_diff": float("inf"), "cosine": None, "atol": atol}
    diff = float(np.abs(a - b).max())
    return {"check": name, "ok": diff <= atol, "max_abs_diff": diff, "cosine": cosine(a, b), "atol": atol}
