"""Parity between backends: the bundle in ONNX Runtime against the fp32 PyTorch reference.

``compare_backends`` measures (identical prompt tokens; kept visual indices and their IoU; position ids;
max abs diff and cosine similarity of the decoder's input embeddings and of the prefill logits;
greedy-token agreement). ``validate_bundle`` runs it on every export; ``vtprune check`` reports it.

What passes depends on the bundle's dtype (``thresholds``). fp32 bundles must match exactly where
exactness is possible (kept indices, positions, greedy tokens) and within ``ATOL`` elsewhere. fp16
bundles are held to cosine similarities (``MIN_COSINE``) and the first greedy token (the agreement over
all steps is reported), and may keep other visual tokens only where the reference scores tie at the cut
(``TIE_RTOL``): on images with flat regions many tokens score alike and fp16 rounding reorders them
(pocket on easy-vqa: IoU down to 0.71, every swapped token within 0.1% of the cut), so an IoU floor
would reject correct graphs. When the kept sets differ, the reference is rerun on the bundle's kept
tokens, so embeddings, positions, logits and greedy tokens measure precision, not tie-breaking (swapped
tokens move to other positions and can change the answer of the model itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtprune.config import PruneConfig
from vtprune.errors import AccuracyError

ATOL = {"embeds": 1e-4, "logits": 1e-3}  # fp32: max abs diff
# fp16 vs the fp32 reference; measured figures are in the README (`vtprune export`).
MIN_COSINE = {"embeds": 0.999, "logits": 0.99}
# fp16: a visual token may replace a reference-kept one if its fp32 reference score is within this fraction
# of its group's cut (the k-th score). Worst gaps measured on pocket: 8.6e-5 (the fp16 graph, 16 easy-vqa
# images, K=64); 9.6e-4 (fp16 PyTorch features, 11 images, K=32/64/128).
TIE_RTOL = 0.01
GREEDY_STEPS = 32


def thresholds(dtype: str) -> dict[str, Any]:
    """What a bundle of ``dtype`` must meet, as recorded in its manifest."""
    if dtype == "fp32":
        return {"kept": "identical", "embeds_atol": ATOL["embeds"], "logits_atol": ATOL["logits"],
                "greedy": "all tokens"}  # fmt: skip
    return {"kept": f"swaps only within {TIE_RTOL:g} of the reference cut score", "embeds_min_cosine":
            MIN_COSINE["embeds"], "logits_min_cosine": MIN_COSINE["logits"], "greedy": "first token"}  # fmt: skip


def compare_backends(
    adapter: Any, cfg: PruneConfig, bundle: Path, image: Any, prompt: str, steps: int, runner: Any = None
) -> list:
    """Rows of metrics comparing PyTorch (``adapter`` + ``cfg``) with ONNX Runtime (``bundle``), or with
    ``runner``: a loaded bundle runner such as ``TrtVlm``, judged like an fp16 bundle (kept sets by IoU,
    logits within the fp16 tolerances) since TensorRT may pick reduced-precision tactics."""
    from vtprune.runtime.ort import OrtVlm
    from vtprune.runtime.pipeline import PrunedVlm
    from vtprune.runtime.timing import StageTimer

    ref, bun = PrunedVlm(adapter, cfg), runner or OrtVlm(bundle, verify=False)
    strict = bun.dtype == "fp32" and runner is None
    image = bun._fit_image(image)
    ref_in, bun_in = ref.inputs(image, prompt), bun.inputs(image, prompt)
    ref_pre, bun_pre = ref.build_prefill(ref_in), bun.prefill_inputs(bun_in, StageTimer())
    ref_keep, bun_keep = ref_pre.visual_keep[0].numpy(), bun_pre["keep_idx"]
    rows = [_exact("prompt token ids", ref_in["input_ids"].numpy(), bun_in["input_ids"].numpy()),
            _exact("kept visual indices", ref_keep, bun_keep) | {"iou": iou(ref_keep, bun_keep)}]  # fmt: skip
    if not strict and not rows[1]["ok"] and ref_keep.shape == bun_keep.shape:
        rows[1] |= _tie_swaps(adapter, cfg, ref_in, ref_keep, bun_keep)
        ref_pre = on_kept_tokens(ref, ref_in, bun_pre["seq_keep"], bun_keep) if rows[1]["ok"] else ref_pre
    rows.append(_exact("position ids", ref_pre.position_ids.numpy(), bun_pre["positions"]))
    if not all(r["ok"] for r in rows):
        return rows
    rows.append(_close("decoder input embeds", ref_pre.embeds.numpy(), bun_pre["embeds"], "embeds", strict))
    bun_logits, _ = bun.prefill(bun_pre)
    if cfg.in_llm:
        ref_logits, ref_selected = routed_reference(ref, ref_pre)
        rows.append(_per_layer("kept visual tokens per routed layer", ref_selected, bun_pre["selected"], strict))
    else:
        ref_logits = ref.prompt_logits(ref_pre)[:, -1].numpy()
    rows.append(_close("prefill logits", ref_logits, bun_logits, "logits", strict))
    with torch.inference_mode():
        ref_tokens = ref.decode(ref_pre, steps, eos=set())
    bun_tokens = bun.decode(bun_pre, steps, StageTimer(), eos=set())
    rows.append(_greedy(f"greedy tokens ({steps} steps)", np.array(ref_tokens), np.array(bun_tokens), strict))
    return rows


def validate_bundle(adapter: Any, cfg: PruneConfig, bundle: Path, image: Any, prompt: str) -> dict[str, Any]:
    """The check run on every export (dtype-aware, see ``thresholds``); raises ``AccuracyError`` with
    the table on any failure."""
    from vtprune.export.bundle import read_manifest

    dtype = read_manifest(bundle, verify=False)["export"]["dtype"]
    rows = compare_backends(adapter, cfg, bundle, image, prompt, GREEDY_STEPS)
    if not all(r["ok"] for r in rows):
        failed = ", ".join(r["check"] for r in rows if not r["ok"])
        raise AccuracyError(f"exported {dtype} bundle disagrees with PyTorch on: {failed}; no bundle was written", rows)
    return {"image_size": list(image.size), "prompt": prompt, "dtype": dtype, "thresholds": thresholds(dtype),
            "checks": rows}  # fmt: skip


@torch.inference_mode()
def routed_reference(ref: Any, prefill: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """In-LLM reference: last-position logits (1, V) of the routed PyTorch prefill and, per routed layer
    in order, the visual tokens it kept."""
    hidden = ref.layerwise_prefill(prefill, ref.new_cache())[1]
    selected = ref.last_trace.selected
    return ref.adapter.lm_head(hidden[:, -1]).float().numpy(), [selected[i].numpy() for i in sorted(selected)]


def _per_layer(name: str, ref: list[np.ndarray], got: list[np.ndarray], strict: bool) -> dict[str, Any]:
    """Kept sets of every routed layer: identical (fp32), or reported by IoU only (fp16, where near-tied
    selector scores may swap; the logits and greedy checks judge the result)."""
    if len(ref) != len(got):
        return {"check": name, "ok": False, "layers": len(ref), "bundle_layers": len(got)}
    pairs = list(zip(ref, got, strict=True))
    identical = sum(a.shape == b.shape and bool(np.array_equal(a, b)) for a, b in pairs)
    return {"check": name, "ok": identical == len(pairs) or not strict, "layers": len(pairs),
            "identical_layers": identical, "min_iou": min((iou(a, b) for a, b in pairs), default=1.0)}  # fmt: skip


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


def on_kept_tokens(ref: Any, inputs: dict[str, torch.Tensor], seq_keep: np.ndarray, visual_keep: np.ndarray) -> Any:
    """The reference ``Prefill`` of the prompt tokens another backend kept.

    Args:
        ref: the reference ``PrunedVlm``.
        inputs: its processor outputs for the prompt.
        seq_keep: (n,) int indices into the unpruned prompt, ascending.
        visual_keep: (K,) int indices into the image's visual tokens, ascending.
    """
    import dataclasses

    from vtprune.runtime.pipeline import PrunedVlm

    full = PrunedVlm(ref.adapter, PruneConfig()).build_prefill(inputs)  # every token, unpruned positions
    seq = torch.from_numpy(seq_keep)
    positions = full.position_ids[..., seq]  # (1, n) or (3, 1, n)
    if ref.cfg.positions == "contiguous":
        positions = torch.arange(seq.numel()).expand_as(positions)
    return dataclasses.replace(full, embeds=full.embeds[:, seq], position_ids=positions, seq_keep=seq[None],
                               visual_keep=torch.from_numpy(visual_keep)[None])  # fmt: skip


def _tie_swaps(adapter: Any, cfg: PruneConfig, inputs: dict, ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Judge kept-set differences against the fp32 reference scores: ok when every token kept in place of a
    reference-kept one scores within ``TIE_RTOL`` of its group's cut."""
    swapped_in = np.setdiff1d(got, ref)
    gaps = reference_cut_gaps(adapter, cfg, inputs)[swapped_in]
    worst = float(gaps.max()) if gaps.size else 0.0
    return {"ok": worst <= TIE_RTOL, "swapped": int(swapped_in.size), "max_cut_gap": worst, "tie_rtol": TIE_RTOL}


@torch.inference_mode()
def reference_cut_gaps(adapter: Any, cfg: PruneConfig, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """(N_v,) how far each visual token's fp32 score lies below its group's cut, relative to the cut
    (<= 0 for tokens the reference keeps; 0 for tokens kept unconditionally)."""
    from vtprune.prune import SELECTORS

    visual = adapter.encode_image(inputs)
    layout, gaps = visual.layout, np.zeros(visual.layout.num_tokens)
    for idx, k in zip(layout.groups, layout.budgets(cfg.keep), strict=True):
        feats = visual.embeds[:, idx].float()  # (1, N_g, D)
        scores = SELECTORS[cfg.method].scores(feats, torch.ones(feats.shape[:2], dtype=torch.bool), k, cfg)[0]
        cut = scores.double().topk(k).values[-1]  # (N_g,) scores, the k-th largest is the cut
        gaps[idx.numpy()] = ((cut - scores.double()) / cut.abs().clamp_min(1e-30)).numpy()
    return gaps


def _close(name: str, a: np.ndarray, b: np.ndarray, key: str, strict: bool) -> dict[str, Any]:
    """Max abs diff within ``ATOL[key]`` (strict) or cosine similarity at least ``MIN_COSINE[key]``."""
    bounds = {"atol": ATOL[key], "min_cosine": None} if strict else {"atol": None, "min_cosine": MIN_COSINE[key]}
    if a.shape != b.shape:
        return {"check": name, "ok": False, "max_abs_diff": float("inf"), "cosine": None} | bounds
    a, b = a.astype(np.float64), b.astype(np.float64)
    diff, cos = float(np.abs(a - b).max()), cosine(a, b)
    ok = diff <= ATOL[key] if strict else cos >= MIN_COSINE[key]
    return {"check": name, "ok": ok, "max_abs_diff": diff, "cosine": cos} | bounds


def _greedy(name: str, ref: np.ndarray, got: np.ndarray, strict: bool) -> dict[str, Any]:
    """Greedy tokens: all identical (strict) or the first; ``agree_prefix`` counts leading agreements."""
    n = min(ref.size, got.size)
    same = ref[:n] == got[:n]
    prefix = int(n if same.all() else np.argmin(same))
    row = _exact(name, ref, got) | {"agreement": float(same.mean()) if n else 0.0, "agree_prefix": prefix}
    return row if strict else row | {"ok": bool(n and same[0])}
