"""``vtprune predict``: per-stage latency of bundles on a device you may not have, as a report with
``"predicted": true``.

Per budget: the vision graph's counted FLOPs and bytes (``costs``), the decoder's analytic ones at the
pruned prefill length and for every decode step (``roofline``), and the device's peaks (``devices``, or
measured here for ``cpu-host``) give a roofline time plus fixed per-op/run/tensor overheads. Token counts
come from a calibration report when one is given, else from one run of the bundle's preprocessing and
vision graph on this CPU. ``--calibrate`` fits one time scale per stage (geometric mean of measured /
predicted over the budgets both have) and reports its leave-one-budget-out error.
"""

from __future__ import annotations

import datetime
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtprune import __version__
from vtprune.bench.config import Budget, PredictConfig
from vtprune.bench.costs import GraphCost, graph_cost, op_counts, ort_op_count, param_count
from vtprune.bench.devices import DEVICES, Device
from vtprune.bench.roofline import (
    PRECISION_BYTES,
    Estimate,
    Peaks,
    Work,
    decoder_work,
    embed_work,
    graph_work,
    roofline,
)
from vtprune.bench.schema import KIND, SCHEMA_VERSION, load_report, validate_report
from vtprune.config import PruneConfig
from vtprune.errors import ConfigError
from vtprune.flops import TextDims, prefill_macs

MODELED = ("vision_prune", "embed", "prefill", "decode_per_token")


@dataclass(frozen=True)
class BundleFacts:
    """What the predictor needs from one bundle."""

    path: Path
    manifest: dict[str, Any]
    budget: Budget
    dims: TextDims
    vision: GraphCost
    decoder_params: int
    embed_params: int
    decoder_ops: int
    vision_ops: int
    vision_tensors: int
    decoder_tensors: int


def text_dims(bundle: Path, manifest: dict[str, Any]) -> TextDims:
    """Decoder shape from the bundle's processor config (no weights needed)."""
    from transformers import AutoConfig

    from vtprune.manifest import Sealed
    from vtprune.models import adapter_for

    proc = bundle / manifest["processor_dir"]
    with Sealed(bundle).directory(manifest["processor_dir"]) as copy:  # only the files the manifest covers
        config = AutoConfig.from_pretrained(str(copy), local_files_only=True, trust_remote_code=False)
    cls = adapter_for(manifest["model"]["model_type"])
    return cls(None, None, proc, config).text_dims()


def bundle_facts(path: Path, device: Device, threads: int | None) -> BundleFacts:
    from vtprune.bench.run import budget_of
    from vtprune.manifest import read_manifest

    manifest = read_manifest(path)
    graphs = manifest["graphs"]
    vision = graph_cost(path / "vision.onnx")
    dec_all, dec_gemm = op_counts(path / "decoder.onnx")
    dec_ops, vis_ops = (dec_gemm, vision.ops_gemm) if device.op_count == "gemm" else (dec_all, vision.ops_all)
    if device.op_count == "all":  # ONNX Runtime on this CPU: count what it executes after its fusions
        dec_ops = ort_op_count(path / "decoder.onnx", threads) or dec_ops
        vis_ops = ort_op_count(path / "vision.onnx", threads) or vis_ops
    return BundleFacts(
        path, manifest, budget_of(manifest), text_dims(path, manifest), vision, param_count(path / "decoder.onnx"),
        param_count(path / "embed.onnx"), dec_ops, vis_ops,
        len(graphs["vision"]["inputs"]) + len(graphs["vision"]["outputs"]),
        len(graphs["decoder"]["inputs"]) + len(graphs["decoder"]["outputs"]),
    )  # fmt: skip


# --- token counts ------------------------------------------------------------------------------------
def measured_tokens(facts: BundleFacts, image: Any, prompt: str) -> tuple[dict[str, int], dict[str, float]]:
    """Token counts and FLOPs of one request, from the bundle's own preprocessing and vision graph (CPU)."""
    from vtprune.backends.ort import OrtVlm
    from vtprune.runtime.timing import StageTimer

    vlm = OrtVlm(facts.path, "cpu", only=("vision", "embed"))  # the decoder is not run: a 7B one would not fit
    prefill = vlm.prefill_inputs(vlm.inputs(image, prompt), StageTimer())
    tokens = {"visual_total": prefill["visual_total"], "visual_kept": prefill["visual_kept"],
              "prompt": prefill["prompt_len"], "prefill": int(prefill["embeds"].shape[1])}  # fmt: skip
    return tokens, vlm.flops(prefill).to_dict()


def substitute(tokens: dict[str, int], bundle_keep: Any, budget: Budget) -> dict[str, int]:
    """Token counts at another budget of the same image: kept = K + the always-kept tokens (LLaVA-NeXT's
    newlines), or a ratio of the prunable tokens; the vision graph itself is assumed unchanged."""
    total, kept = tokens["visual_total"], tokens["visual_kept"]
    always = max(0, kept - bundle_keep) if isinstance(bundle_keep, int) else 0
    if budget.keep is None:
        new = total
    elif isinstance(budget.keep, int):
        new = min(total, budget.keep + always)
    else:
        new = math.floor(budget.keep * (total - always)) + always
    return tokens | {"visual_kept": new, "prefill": tokens["prefill"] - kept + new}


# --- the model ---------------------------------------------------------------------------------------
def peaks_for(device: Device, precision: str) -> Peaks:
    if precision not in device.peak_tflops:
        have = ", ".join(device.peak_tflops)
        raise ConfigError(f"--precision {precision}: device {device.name} has peaks for {have} only")
    return Peaks(device.peak_tflops[precision] * 1e12, device.mem_bandwidth_gbs * 1e9, device.efficiency["compute"],
                 device.efficiency["memory"], device.op_overhead_us * 1e-6, device.run_overhead_us * 1e-6,
                 device.io_overhead_us * 1e-6)  # fmt: skip


def _sum_estimates(estimates: list[Estimate]) -> Estimate:
    bounds = [e.bound for e in estimates]
    return Estimate(sum(e.compute_ms for e in estimates), sum(e.memory_ms for e in estimates),
                    sum(e.overhead_ms for e in estimates), sum(e.total_ms for e in estimates),
                    max(set(bounds), key=bounds.count))  # fmt: skip


def stage_estimates(facts: BundleFacts, tokens: dict[str, int], steps: int, precision: str, peaks: Peaks) -> dict:
    """(Work, Estimate) per modeled stage; decode sums its steps' estimates (the cache grows per step)."""
    v = facts.vision
    dims, n = facts.dims, tokens["prefill"]
    works = {
        "vision_prune": graph_work(v.flops, v.weight_params, v.activation_elems, precision, facts.vision_ops,
                                   facts.vision_tensors),
        "embed": embed_work(dims.hidden, tokens["prompt"], precision),
        "prefill": decoder_work(dims, facts.decoder_params, n, 0, precision, facts.decoder_ops, facts.decoder_tensors),
    }  # fmt: skip
    out = {k: (w, roofline(w, peaks)) for k, w in works.items()}
    ops, tensors = facts.decoder_ops, facts.decoder_tensors
    step_works = [embed_work(dims.hidden, 1, precision)
                  + decoder_work(dims, facts.decoder_params, 1, n + i, precision, ops, tensors)
                  for i in range(steps)]  # fmt: skip
    if steps:
        total = sum(step_works[1:], step_works[0])
        out["decode"] = (total, _sum_estimates([roofline(w, peaks) for w in step_works]))
    return out


def _stat(ms: float, roof: dict | None = None, **extra: Any) -> dict[str, Any]:
    out = {"p50_ms": ms, "mean_ms": ms, "p90_ms": None, "p99_ms": None, "min_ms": None}
    return out | ({"roofline": roof} if roof else {}) | extra


def budget_entry(facts: BundleFacts, budget: Budget, tokens: dict, flops: dict, steps: int, precision: str,
                 peaks: Peaks) -> dict[str, Any]:  # fmt: skip
    """A predicted budget entry (uncalibrated): modeled stages, TTFT without preprocessing, e2e."""
    from vtprune.bench.targets import bundle_fingerprint

    est = stage_estimates(facts, tokens, steps, precision, peaks)
    stages = {k: _stat(e.total_ms, e.to_dict(w)) for k, (w, e) in est.items() if k != "decode"}
    if facts.vision.unresolved:  # shapes inference could not resolve: their FLOPs are missing
        stages["vision_prune"]["roofline"]["unresolved_ops"] = facts.vision.unresolved
    if steps:
        w, e = est["decode"]
        stages["decode"] = _stat(e.total_ms, e.to_dict(w))
        per_tok = Work(w.flops / steps, w.bytes / steps, w.ops // steps, w.runs // steps, w.tensors // steps)
        c, m, o, t = (x / steps for x in (e.compute_ms, e.memory_ms, e.overhead_ms, e.total_ms))
        per_est = Estimate(c, m, o, t, e.bound)
        stages["decode_per_token"] = _stat(per_est.total_ms, per_est.to_dict(per_tok))
    n_flops, full = prefill_macs(facts.dims, tokens["prefill"]), prefill_macs(facts.dims, tokens["prompt"])
    flops = flops | {"prefill_macs_pruned": n_flops, "prefill_macs_unpruned": full}
    flops["saved_fraction"] = 1 - (n_flops + flops["prune_stage_macs"]) / flops["prefill_macs_unpruned"]
    flops["prefill_flops"] = 2 * n_flops
    prune = PruneConfig.from_dict(facts.manifest["prune"])
    prune = budget.prune_config(prune.method if prune.prunes else "gprune", prune)
    return {"label": budget.label, "keep": budget.keep, "prune": prune.to_dict(), "bundle": str(facts.path),
            "bundle_fingerprint": bundle_fingerprint(facts.manifest), "tokens": tokens | {
                "visual_pruned": tokens["visual_total"] - tokens["visual_kept"], "decode_steps": steps},
            "flops": flops, "stages": stages, "throughput": {}, "memory": memory(facts, tokens, steps, precision),
            "varies_across_images": False}  # fmt: skip


def memory(facts: BundleFacts, tokens: dict, steps: int, precision: str) -> dict[str, Any]:
    wb, _, kb = PRECISION_BYTES[precision]
    d = facts.dims
    kv = d.layers * 2 * d.kv_heads * d.head_dim * (tokens["prefill"] + steps) * kb
    weights = (facts.vision.weight_params + facts.decoder_params + facts.embed_params) * wb
    return {"peak_rss_mb": None, "rss_scope": None, "peak_gpu_mb": None, "gpu_method": None,
            "weights_mb": weights / 2**20, "kv_cache_mb": kv / 2**20}  # fmt: skip


def finish(entry: dict[str, Any], preprocess_ms: float | None) -> None:
    """Add TTFT and e2e (sums of the stages) and the Edge-LLM throughputs to a predicted entry."""
    from vtprune.bench.run import throughput

    st = entry["stages"]
    if preprocess_ms is not None:
        st["preprocess"] = _stat(preprocess_ms, source="calibration report (host-side stage, not modeled)")
    ttft = sum(st[k]["p50_ms"] for k in ("preprocess", "vision_prune", "embed", "prefill") if k in st)
    st["ttft"] = _stat(ttft, includes_preprocess=preprocess_ms is not None)
    st["e2e"] = _stat(ttft + st.get("decode", {}).get("p50_ms", 0.0), includes_preprocess=preprocess_ms is not None)
    from vtprune.bench.schema import STAGES

    entry["stages"] = {k: st[k] for k in STAGES if k in st}
    entry["throughput"] = throughput(entry["stages"], entry["tokens"])


# --- calibration -------------------------------------------------------------------------------------
def fit_time_scales(predicted: dict[str, dict], measured: dict[str, dict]) -> dict[str, Any]:
    """Per-stage time scale = geometric mean over shared budgets of measured / predicted p50, and the
    leave-one-budget-out error of each budget (predicted with the scale fitted on the others)."""
    labels = [lab for lab in predicted if lab in measured]
    if not labels:
        raise ConfigError("the calibration report has none of the predicted budgets; bench the same bundles")
    scales, loo = {}, {}
    for stage in MODELED:
        pairs = {lab: (predicted[lab].get(stage), measured[lab].get(stage)) for lab in labels}
        pairs = {k: (p, m) for k, (p, m) in pairs.items() if p and m}
        if not pairs:
            continue
        logs = {k: math.log(m / p) for k, (p, m) in pairs.items()}
        scales[stage] = math.exp(statistics.fmean(logs.values()))
        if len(pairs) > 1:
            loo[stage] = {k: (math.exp(statistics.fmean(v for j, v in logs.items() if j != k)) * p / m - 1) * 100
                          for k, (p, m) in pairs.items()}  # fmt: skip
    return {"budgets": labels, "time_scale": scales, "loo_error_pct": loo}


def apply_scales(entry: dict[str, Any], scales: dict[str, float]) -> None:
    st, steps = entry["stages"], entry["tokens"]["decode_steps"]
    for stage, scale in scales.items():
        if stage in st:
            st[stage]["p50_ms"] = st[stage]["mean_ms"] = st[stage]["p50_ms"] * scale
            st[stage]["roofline"]["time_scale"] = scale
    if "decode_per_token" in st and "decode" in st:
        st["decode"]["p50_ms"] = st["decode"]["mean_ms"] = st["decode_per_token"]["p50_ms"] * steps
        st["decode"]["roofline"]["time_scale"] = scales.get("decode_per_token", 1.0)


def _p50s(entries: list[dict]) -> dict[str, dict[str, float]]:
    return {e["label"]: {k: v["p50_ms"] for k, v in e["stages"].items()} for e in entries}


# --- the command -------------------------------------------------------------------------------------
def resolve_device(cfg: PredictConfig) -> Device:
    from vtprune.bench.microbench import cpu_host_device

    return DEVICES[cfg.device] or cpu_host_device(cfg.threads)


def _sample(cfg: PredictConfig, calib: dict | None) -> tuple[Any, str, int, dict]:
    """Image, prompt, decode length and workload block: flags first, then the calibration report, then
    ``bench``'s defaults (generated scene, its prompt, 16 tokens)."""
    from vtprune.bench.config import DEFAULT_PROMPT
    from vtprune.bench.workload import describe, generated_scene
    from vtprune.images import load_image

    w = calib["workload"] if calib else {}
    prompt = cfg.prompt or w.get("prompt") or DEFAULT_PROMPT
    new_tokens = cfg.new_tokens or int(w.get("new_tokens", 16))
    sample = generated_scene(prompt)[0]
    image = load_image(cfg.image) if cfg.image else sample.image
    if calib and not (cfg.prompt or cfg.image):  # the report's own workload: compare accepts the pair
        keys = ("images", "images_dir", "num_images", "image_sizes", "sources", "prompt", "num_prompts")
        workload = {k: w.get(k) for k in keys}
    elif cfg.image:
        workload = {"images": "file", "images_dir": None, "num_images": 1, "image_sizes": [list(image.size)],
                    "sources": [cfg.image.name], "prompt": prompt, "num_prompts": 1}  # fmt: skip
    else:
        workload = describe([sample], None, None)
    workload |= {"new_tokens": new_tokens, "eos_ignored": True, "warmup": 0, "iters": 0}
    return image, prompt, new_tokens, workload


def plan(cfg: PredictConfig, facts: list[BundleFacts]) -> list[tuple[BundleFacts, Budget]]:
    if cfg.budgets:
        return [(facts[0], b) for b in cfg.budgets]
    return [(f, f.budget) for f in facts]


def run_predict(cfg: PredictConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """The predicted report for ``cfg`` (nothing is written here)."""
    from vtprune.bench.run import common_prune, notes_for
    from vtprune.runtime.report import environment

    calib = load_report(cfg.calibrate) if cfg.calibrate else None
    device = resolve_device(cfg)
    precision = cfg.precision or device.default_precision
    peaks = peaks_for(device, precision)
    facts = [bundle_facts(Path(b), device, cfg.threads) for b in cfg.bundles]
    image, prompt, steps_plus_one, workload = _sample(cfg, calib)
    steps = steps_plus_one - 1
    calib_entries = {e["label"]: e for e in calib["budgets"]} if calib else {}
    entries = []
    for f, budget in plan(cfg, facts):
        own = calib_entries.get(f.budget.label)
        if own and not cfg.image:  # the calibration report ran this bundle on this workload
            tokens = {k: own["tokens"][k] for k in ("visual_total", "visual_kept", "prompt", "prefill")}
            flops = dict(own["flops"])
        else:
            tokens, flops = measured_tokens(f, image, prompt)
        if budget.label != f.budget.label:
            keep = PruneConfig.from_dict(f.manifest["prune"]).keep
            tokens = substitute(tokens, keep, budget)
        entries.append(budget_entry(f, budget, tokens, flops, steps, precision, peaks))
    calibration = calibrate(entries, calib, cfg) if calib else None
    for e in entries:
        pre = calib_entries.get(e["label"], {}).get("stages", {}).get("preprocess", {}).get("p50_ms") if calib else None
        finish(e, pre)
    m = facts[0].manifest
    provider = "cpu" if device.name == "cpu-host" else device.runtime
    subject = {"backend": "ort", "model": m["model"]["source"], "family": m["model"]["family"],
               "model_type": m["model"]["model_type"], "provider": provider,
               "threads": cfg.threads, "precision": precision, "method": _method(entries),
               "prune": common_prune(entries)}  # fmt: skip
    report = {
        "schema_version": SCHEMA_VERSION, "kind": KIND, "predicted": True,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "vtprune_version": __version__, "command": argv, "config": cfg.to_dict(), "subject": subject,
        "workload": workload, "environment": environment(f"predicted:{device.name}", precision),
        "device": device.to_dict(precision), "calibration": calibration, "memory_check": memory_check(entries, device),
        "budgets": entries, "notes": notes_for(subject, prediction_notes(device, calibration, cfg)),
    }  # fmt: skip
    return validate_report(report)


def _method(entries: list[dict]) -> str:
    methods = {e["prune"]["method"] for e in entries} - {"none"}
    return methods.pop() if len(methods) == 1 else "gprune"


def calibrate(entries: list[dict], calib: dict, cfg: PredictConfig) -> dict[str, Any]:
    fit = fit_time_scales(_p50s(entries), _p50s(calib["budgets"]))
    for e in entries:
        apply_scales(e, fit["time_scale"])
    import platform

    env = calib["environment"]
    same = cfg.device == "cpu-host" and env.get("host") == platform.node() and env.get("cores") == os.cpu_count()
    return {"report": str(cfg.calibrate), "measured_on": calib["environment"].get("cpu"), "same_machine": bool(same),
            **fit}  # fmt: skip


def memory_check(entries: list[dict], device: Device) -> dict[str, Any]:
    need = max(e["memory"]["weights_mb"] + e["memory"]["kv_cache_mb"] for e in entries)
    have = device.memory_gb * 1024
    return {"needed_mb": need, "device_mb": have, "fits": need < have,
            "note": "weights of the three graphs + KV cache at the longest context; no runtime workspace"}  # fmt: skip


def prediction_notes(device: Device, calibration: dict | None, cfg: PredictConfig) -> tuple[str, ...]:
    notes = [f"PREDICTED for {device.name} by a roofline model, not measured. Preprocessing (host CPU) is "
             + ("copied from the calibration report." if calibration else "not modeled, so TTFT and e2e exclude it.")]
    if device.uncertain:
        notes.append(f"Uncertain device numbers: {'; '.join(device.uncertain)}.")
    if calibration and not calibration["same_machine"]:
        notes.append(f"Time scales were fitted on a report measured on {calibration['measured_on']}, not on "
                     f"{device.name}: they carry that machine's runtime overheads.")
    return tuple(notes)
