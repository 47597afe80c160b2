"""Parity between backends: the bundle in ONNX Runtime against the fp32 PyTorch reference.

``compare_backends`` measures (identical prompt tokens; kept visual indices, their IoU and tie margin;
position ids; max abs diff and cosine similarity of the decoder's input embeddings and of the prefill
logits; per-layer kept sets of routed bundles; greedy-token agreement). ``validate_bundle`` runs it on every
export; ``vtprune check`` reports it.

Kept sets are judged by their **tie margin** (``vtprune.prune.ties``), on any CPU: a bundle may keep other
tokens than PyTorch only where the reference's own decision values (scores, greedy steps, selector
attention) put them within a small fraction of their range of the cut, because the last bits of a GEMM
differ between BLAS kernels and CPUs and near-tied tokens then trade places (``ties.FP32_MARGIN``; fp16
bundles ``ties.FP16_MARGIN``). The reference then adopts the bundle's kept sets (``Follow``), so
embeddings, positions, logits and greedy tokens measure the graphs, not tie-breaking. What else passes
depends on the bundle's dtype (``thresholds``): fp32 within ``ATOL`` and every greedy token; fp16 by cosine
similarity (``MIN_COSINE``) and the first greedy token (the agreement over all steps is reported).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtprune.config import PruneConfig
from vtprune.errors import AccuracyError
from vtprune.export.memory import SLICE_LAYERS  # the memory plan counts the same layers
from vtprune.prune.ties import margin_limit

ATOL = {"embeds": 1e-4, "logits": 1e-3}  # fp32: max abs diff
# Reduced precision vs the fp32 reference, by what the language-model graphs hold; measured figures are in
# the README (`vtprune export`). int8/int4 embeddings are the quantized table's rows (text tokens only).
MIN_COSINE = {"fp16": {"embeds": 0.999, "logits": 0.99}, "int8": {"embeds": 0.999}, "int4": {"embeds": 0.99},
              "w8a8": {"embeds": 0.999}, "vision-int8": {"embeds": 0.995}}  # fmt: skip
# int8 / int4 weights shift the whole logit vector (round-to-nearest int4 on the pocket VLM: cosine 0.74 with
# 30 of 32 greedy tokens kept), so their next-token distributions are compared: KL(reference || bundle) in
# nats at the last prompt position, as llama.cpp judges its quantized formats.
# int4 on a 135M model moves it by up to 1.5 nats on easy-vqa prompts (its accuracy is measured apart), so the
# int4 bound catches broken graphs (wrong feeds, overflow), not quantization error.
# w8a8 (one activation scale per tensor) moves it more than int8 weights: up to 0.11 nats on the pocket VLM
# (G-Prune 64; int8 weights there: 0.055).
MAX_KL = {"int8": 0.1, "int4": 2.0, "w8a8": 0.5, "vision-int8": 0.1}
GREEDY_STEPS = 32
# Reduced precision: the bundle's first greedy token must be among the reference's top-r (1: the same token).
# int4 weights move near-flat logits (the tiny random test models) by more than their gaps.
FIRST_TOKEN_RANK = {"fp16": 1, "int8": 1, "int4": 5, "w8a8": 1, "vision-int8": 1}
# A quantized language model behind an int8 vision graph (whose kept tokens are not gated) reads another
# prompt than the reference's: its first token is judged as the reference's top 2. Pocket VLM, w8a8 + int8
# vision, G-Prune 64, 48 easy-vqa prompts: the first token kept on 44, the validation image's on rank 1.
FIRST_TOKEN_RANK_BOTH_QUANTIZED = 2


def first_token_rank(precision: str, vision_quantized: bool) -> int:
    """How far down the reference's ranking the bundle's first greedy token may be (1: the same token)."""
    if precision == "fp32":
        return 1  # every greedy token is gated
    both = vision_quantized and precision not in ("fp16", "vision-int8")
    return max(FIRST_TOKEN_RANK[precision], FIRST_TOKEN_RANK_BOTH_QUANTIZED) if both else FIRST_TOKEN_RANK[precision]


def thresholds(precision: str, vision_quantized: bool = False) -> dict[str, Any]:
    """What a bundle whose language model holds ``precision`` weights must meet, as in its manifest; an int8
    vision graph (``vision_quantized``) may choose other visual tokens: their margins are reported."""
    vision = margin_limit("fp16" if precision == "fp16" else "fp32")  # the vision graph is fp32 unless --vision
    kept = ("int8 vision graph: margins reported, not gated" if vision_quantized
            else f"identical up to ties: tie margin <= {vision:g} of the reference's score range")  # fmt: skip
    if precision == "fp32":
        return {"kept": kept, "embeds_atol": ATOL["embeds"], "logits_atol": ATOL["logits"], "greedy": "all tokens"}
    cos = MIN_COSINE[embeds_precision(precision, vision_quantized)] | {
        k: v for k, v in MIN_COSINE[precision].items() if k != "embeds"}
    rank = first_token_rank(precision, vision_quantized)
    first = "first token" if rank == 1 else f"first token in the reference's top {rank}"
    if margin_limit(precision) is None:
        kept += "; routed layers: margins reported, not gated"
    logits = {"logits_max_kl": MAX_KL[precision]} if precision in MAX_KL else {"logits_min_cosine": cos["logits"]}
    return {"kept": kept, "embeds_min_cosine": cos["embeds"], **logits, "greedy": first}


def embeds_precision(precision: str, vision_quantized: bool) -> str:
    """The precision whose cosine floor judges the decoder's input embeddings: an int8 vision graph's
    tokens move more than an int8 language model's embedding table does."""
    if vision_quantized and MIN_COSINE.get(precision, {}).get("embeds", 1.0) > MIN_COSINE["vision-int8"]["embeds"]:
        return "vision-int8"
    return precision


def compare_backends(
    adapter: Any, cfg: PruneConfig, bundle: Path, image: Any, prompt: str, steps: int, runner: Any = None
) -> list:
    """Rows of metrics comparing PyTorch (``adapter`` + ``cfg``) with ONNX Runtime (``bundle``), or with
    ``runner``: a loaded bundle runner such as ``TrtVlm``, judged like an fp16 bundle (kept sets within the
    fp16 tie margin, logits within the fp16 tolerances) since TensorRT may pick reduced-precision tactics,
    or at its bundle's own precision where that is a quantized one (an int4-trt engine as int4)."""
    from vtprune.backends.ort import OrtVlm
    from vtprune.runtime.generate import decode
    from vtprune.runtime.pipeline import Follow, PrunedVlm
    from vtprune.runtime.timing import StageTimer

    bun = runner or OrtVlm(bundle, verify=False)
    precision = "fp16" if runner is not None and bun.precision in ("fp32", "fp16") else bun.precision
    vision_limit = margin_limit(bun.dtype if runner is None else "fp16")
    if bun.vision_quantized:  # int8 features may rank tokens differently: reported
        vision_limit = None
    image = bun._fit_image(image)
    if bun.manifest["graphs"]["vision"]["meta"].get("dynamic_grid"):
        # the bundle's processor bounds the image size (at least K tokens): the reference processes alike
        adapter.processor.image_processor.size = dict(bun.adapter.processor.image_processor.size)
    bun_in = bun.inputs(image, prompt)
    bun_pre = bun.prefill_inputs(bun_in, StageTimer())
    bun_keep = bun_pre["keep_idx"]
    # the reference adopts the bundle's kept set, so what follows measures the graphs, not tie-breaking
    ref = PrunedVlm(adapter, cfg, follow=Follow(visual=torch.from_numpy(np.asarray(bun_keep)).long()[None]))
    ref_in = ref.inputs(image, prompt)
    ref_pre = ref.build_prefill(ref_in)
    own_keep = ref.last_own_keep[0].cpu().numpy()  # the reference's own choice on the same features
    rows = [_exact("prompt token ids", ref_in["input_ids"].numpy(), bun_in["input_ids"].numpy()),
            kept_row("kept visual indices", own_keep, bun_keep, ref.last_margins, vision_limit)]  # fmt: skip
    rows.append(_exact("position ids", ref_pre.position_ids.numpy(), bun_pre["positions"]))
    if not all(r["ok"] for r in rows):
        return rows
    quantized_vision = bun.vision_quantized
    rows.append(_close("decoder input embeds", ref_pre.embeds.numpy(), bun_pre["embeds"], "embeds",
                       embeds_precision(precision, quantized_vision)))  # fmt: skip
    bun_logits, _ = bun.prefill(bun_pre)
    if cfg.in_llm:
        row, ref, ref_logits = _routed(adapter, cfg, ref, ref_pre, bun_pre["selected"], margin_limit(precision))
        rows.append(row)
        if not row["ok"]:
            return rows
    else:
        ref_logits = ref.prompt_logits(ref_pre)[:, -1].numpy()
    rows.append(_logits_row("prefill logits", ref_logits, bun_logits, precision))
    ref_tokens = decode(ref, ref_pre, steps, eos=set())
    bun_tokens = decode(bun, bun_pre, steps, eos=set())
    greedy = f"greedy tokens ({steps} steps)"
    rows.append(_greedy(greedy, np.array(ref_tokens), np.array(bun_tokens), precision, ref_logits,
                        first_token_rank(precision, quantized_vision)))
    return rows


def kept_row(name: str, own: np.ndarray, got: np.ndarray, margins: list[float], limit: float | None) -> dict:
    """A kept-set row: identical, or every difference a tie (largest margin within ``limit``)."""
    worst = max(margins, default=0.0)
    same = own.shape == got.shape and bool(np.array_equal(own, got))
    return {"check": name, "ok": same or limit is None or worst <= limit, "iou": iou(own, got),
            "swapped": int(np.setdiff1d(got, own).size), "max_margin": worst, "margin_limit": limit}  # fmt: skip


def _routed(
    adapter: Any, cfg: PruneConfig, ref: Any, prefill: Any, got: list[np.ndarray], limit: float | None
) -> tuple:
    """In-LLM bundles: the routed reference's own per-layer kept sets against the bundle's, judged by tie
    margin; then the reference that adopted the bundle's sets, and its last-position logits (1, V)."""
    import dataclasses

    from vtprune.runtime.pipeline import PrunedVlm

    name = "kept visual tokens per routed layer"
    _, own = routed_reference(ref, prefill)
    layers = sorted(ref.last_trace.selected)
    if len(layers) != len(got):
        return {"check": name, "ok": False, "layers": len(layers), "bundle_layers": len(got)}, ref, None
    followed = {i: torch.from_numpy(g).long() for i, g in zip(layers, got, strict=True)}
    follow = dataclasses.replace(ref.follow, layers=followed)
    ref = PrunedVlm(adapter, cfg, follow=follow)
    logits, _ = routed_reference(ref, prefill)
    pairs = list(zip(own, got, strict=True))
    worst = max(ref.last_trace.margins.values(), default=0.0)
    identical = sum(a.shape == b.shape and bool(np.array_equal(a, b)) for a, b in pairs)
    row = {"check": name, "ok": identical == len(pairs) or limit is None or worst <= limit, "layers": len(pairs),
           "identical_layers": identical, "min_iou": min((iou(a, b) for a, b in pairs), default=1.0),
           "max_margin": worst, "margin_limit": limit}  # fmt: skip
    return row, ref, logits


def validate_bundle(adapter: Any, cfg: PruneConfig, bundle: Path, image: Any, prompt: str) -> dict[str, Any]:
    """The check run on every export (dtype-aware, see ``thresholds``); raises ``AccuracyError`` with
    the table on any failure."""
    from vtprune.manifest import judged_precision, read_manifest

    export = read_manifest(bundle, verify=False)["export"]
    dtype, precision = export["dtype"], judged_precision(export)
    rows = compare_backends(adapter, cfg, bundle, image, prompt, GREEDY_STEPS)
    if not all(r["ok"] for r in rows):
        failed = ", ".join(r["check"] for r in rows if not r["ok"])
        raise AccuracyError(f"exported {precision} bundle disagrees with PyTorch on: {failed}; no bundle was written",
                            rows)  # fmt: skip
    return {"image_size": list(image.size), "prompt": prompt, "dtype": dtype, "precision": precision,
            "thresholds": thresholds(precision, export.get("vision") is not None), "checks": rows}  # fmt: skip


def validate_slice(adapter: Any, cfg: PruneConfig, bundle: Path, image: Any, prompt: str,
                   layers: int | None = None) -> dict[str, Any]:  # fmt: skip
    """``validate_bundle`` on a slice of ``bundle``, for a model whose full bundle does not fit in ONNX
    Runtime beside its PyTorch reference (``export.memory``): the bundle's own vision and embedding graphs,
    and a decoder exported again by the same code from the model cut to its first ``layers`` layers (final
    norm and LM head kept), against the PyTorch model cut the same way. ``adapter``'s model is cut in place
    (the export is done with it). Pre-LLM bundles only (a routed prefill needs every layer)."""
    import os
    import shutil
    import tempfile

    from vtprune.export.decoder import export_decoder
    from vtprune.export.memory import release_memory
    from vtprune.manifest import read_manifest, write_manifest

    manifest = read_manifest(bundle, verify=False)
    total, layers = adapter.text_dims().layers, layers or SLICE_LAYERS
    cut_decoder(adapter, layers)
    release_memory()
    work = Path(tempfile.mkdtemp(prefix=f".{bundle.name}.slice-", dir=bundle.parent))
    try:
        shipped = set(manifest["graphs"]["decoder"].get("files", ["decoder.onnx"]))
        for rel in manifest["files"]:
            if rel not in shipped:
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(bundle / rel, work / rel)
        precision = {k: manifest["graphs"]["decoder"][k] for k in ("dtype", "fp32_parts")}
        manifest["graphs"]["decoder"] = export_decoder(adapter, work / "decoder.onnx", manifest["export"]["opset"])
        manifest["graphs"]["decoder"] |= precision
        write_manifest(work, manifest)
        result = validate_bundle(adapter, cfg, work, image, prompt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    scope = (f"slice: vision and embed graphs as shipped; the decoder exported again with its first {layers} of "
             f"{total} layers (final norm and LM head kept), against PyTorch {adapter.model.dtype} cut the same way")
    return result | {"scope": scope, "reference": str(adapter.model.dtype).removeprefix("torch.")}


def cut_decoder(adapter: Any, layers: int) -> None:
    """Keep the first ``layers`` decoder layers of ``adapter``'s model (in place; the rest are emptied)."""
    from torch import nn

    stack, config = adapter.decoder, adapter.text_config
    for dropped in list(stack.layers)[layers:]:  # emptied, not only unlinked; the full export's tracing
        for tensor in [*dropped.parameters(), *dropped.buffers()]:  # still holds aliases of some storages
            tensor.data = torch.empty(0, dtype=tensor.dtype)
    stack.layers = nn.ModuleList(list(stack.layers)[:layers])
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]


@torch.inference_mode()
def routed_reference(ref: Any, prefill: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """In-LLM reference: last-position logits (1, V) of the routed PyTorch prefill and, per routed layer
    in order, the visual tokens it kept."""
    hidden = ref.layerwise_prefill(prefill, ref.new_cache())[1]
    selected = ref.last_trace.selected
    return ref.adapter.lm_head(hidden[:, -1]).float().numpy(), [selected[i].numpy() for i in sorted(selected)]


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The compact per-check table: one line per row, ``ok``/``FAIL``, the check, then its figures."""

    def figure(key: str, value: Any) -> str:
        return f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"

    lines = []
    for row in rows:
        detail = ", ".join(figure(k, v) for k, v in row.items() if k not in ("check", "ok") and v is not None)
        lines.append(f"  {'ok ' if row['ok'] else 'FAIL'} {row['check']}: {detail or 'identical'}")
    return "\n".join(lines)


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


def _close(name: str, a: np.ndarray, b: np.ndarray, key: str, precision: str) -> dict[str, Any]:
    """Max abs diff within ``ATOL[key]`` (fp32) or cosine similarity at least ``MIN_COSINE[precision][key]``."""
    strict = precision == "fp32"
    floor = None if strict else MIN_COSINE[precision][key]
    bounds = {"atol": ATOL[key] if strict else None, "min_cosine": floor}
    if a.shape != b.shape:
        return {"check": name, "ok": False, "max_abs_diff": float("inf"), "cosine": None} | bounds
    a, b = a.astype(np.float64), b.astype(np.float64)
    diff, cos = float(np.abs(a - b).max()), cosine(a, b)
    ok = diff <= ATOL[key] if strict else cos >= floor
    return {"check": name, "ok": ok, "max_abs_diff": diff, "cosine": cos} | bounds


def _logits_row(name: str, ref: np.ndarray, got: np.ndarray, precision: str) -> dict[str, Any]:
    """``_close`` on the logits, plus the KL divergence of the next-token distributions, which judges
    int8 / int4 bundles (``MAX_KL``)."""
    if precision not in MAX_KL or ref.shape != got.shape:
        return _close(name, ref, got, "logits", precision)
    row = _close(name, ref, got, "logits", "fp16") | {"min_cosine": None}
    kl = kl_divergence(ref, got)
    return row | {"ok": kl <= MAX_KL[precision], "kl": kl, "max_kl": MAX_KL[precision]}


def kl_divergence(ref: np.ndarray, got: np.ndarray) -> float:
    """KL(softmax(ref) || softmax(got)) in nats over the last axis, the largest over leading rows."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).max())


def _greedy(
    name: str, ref: np.ndarray, got: np.ndarray, precision: str, ref_logits: np.ndarray, max_rank: int | None = None
) -> dict[str, Any]:
    """Greedy tokens: all identical (fp32), or a first token the reference ranks within ``max_rank`` (default
    ``FIRST_TOKEN_RANK[precision]``) of its own (``first_token_rank`` 0: the same token); ``agree_prefix``
    counts leading agreements."""
    n = min(ref.size, got.size)
    same = ref[:n] == got[:n]
    prefix = int(n if same.all() else np.argmin(same))
    row = _exact(name, ref, got) | {"agreement": float(same.mean()) if n else 0.0, "agree_prefix": prefix}
    if precision == "fp32" or not n:
        return row
    logits = np.asarray(ref_logits, dtype=np.float64).ravel()
    rank = int((logits > logits[got[0]]).sum())  # reference tokens strictly more likely than the bundle's first
    return row | {"ok": rank < (max_rank or FIRST_TOKEN_RANK[precision]), "first_token_rank": rank}
