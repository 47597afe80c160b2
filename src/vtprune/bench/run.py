"""``run_bench``: every budget's target, warmed up and timed with ``measure_stages``, into one report."""

from __future__ import annotations

import datetime
import gc
import re
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vtprune import __version__
from vtprune.bench.config import BenchConfig, Budget
from vtprune.bench.load import background_load
from vtprune.bench.schema import KIND, SCHEMA_VERSION, STAT_KEYS, validate_report
from vtprune.bench.targets import Target, stage_metrics
from vtprune.bench.workload import Sample, describe, load_samples
from vtprune.config import PruneConfig
from vtprune.errors import BundleError, ConfigError
from vtprune.runtime.generate import Generation
from vtprune.runtime.report import Timing, environment, measure_stages, peak_rss_mb, reset_peak_rss

Log = Callable[[str], None]
TINY_NOTE = ("{model} is a tiny random-weight model: these numbers check the pipeline only and say nothing "
             "about the latency of a real VLM.")  # fmt: skip


def _stderr(msg: str) -> None:
    print(f"vtprune bench: {msg}", file=sys.stderr, flush=True)


# --- budgets -> bundles -----------------------------------------------------------------------------
def budget_of(manifest: dict[str, Any]) -> Budget:
    """The budget a bundle was exported at (the ratio asked for, if it was given as one)."""
    prune = PruneConfig.from_dict(manifest["prune"])
    return Budget(manifest.get("keep_requested", prune.keep) if prune.prunes else None)


def model_slug(model: str) -> str:
    """A directory name for a model: built-in names as they are, checkpoint paths by name + path hash."""
    import hashlib

    if not Path(model).exists():
        return re.sub(r"[^A-Za-z0-9_.-]", "_", model)
    digest = hashlib.sha256(str(Path(model).resolve()).encode()).hexdigest()[:8]
    return f"{Path(model).resolve().name}-{digest}"


def ensure_bundle(model: str, prune: PruneConfig, path: Path, cfg: BenchConfig, log: Log) -> Path:
    """The bundle for ``prune`` at ``path``: reused when its settings match, else exported there."""
    from vtprune.api import export_bundle
    from vtprune.export.bundle import ExportConfig
    from vtprune.manifest import MANIFEST, read_manifest

    if (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        have = dict(manifest["prune"], keep=manifest.get("keep_requested", manifest["prune"]["keep"]))
        if have != prune.to_dict() or manifest["model"]["source"] != model:
            raise BundleError(f"{path} holds a bundle with other settings; delete it or pass another --work-dir")
        log(f"reusing {path}")
        return path
    log(f"exporting {model} at budget {Budget(prune.keep).label} to {path}")
    export_bundle(model, prune, ExportConfig(validate=not cfg.no_validate), path, cfg.cache_dir, log)
    return path


def ort_bundles(cfg: BenchConfig, log: Log) -> list[tuple[Budget, Path]]:
    """(budget, bundle) pairs: the given bundles, or one exported per budget into the work dir."""
    from vtprune.manifest import read_manifest
    from vtprune.models.tiny import default_cache_dir

    if cfg.bundles and not cfg.budgets:
        pairs = [(budget_of(read_manifest(b, verify=False)), Path(b)) for b in cfg.bundles]
        labels = [b.label for b, _ in pairs]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"two bundles have the same budget ({', '.join(labels)}); bench one of them at a time")
        return pairs
    if cfg.bundles:  # one bundle + budgets: its source model at each budget, with its G-Prune settings
        manifest = read_manifest(cfg.bundles[0], verify=False)
        model, base = manifest["model"]["source"], PruneConfig.from_dict(manifest["prune"])
        method = base.method if base.prunes else cfg.method
    else:
        model, base, method = str(cfg.model), PruneConfig(), cfg.method
    work = (cfg.work_dir or default_cache_dir() / "bench") / model_slug(model)
    pairs = []
    for budget in cfg.budgets:
        prune = budget.prune_config(method, base)
        pairs.append((budget, ensure_bundle(model, prune, work / f"{prune.method}-{budget.key}", cfg, log)))
    return pairs


def targets(cfg: BenchConfig, log: Log) -> Iterator[tuple[Budget, Callable[[], Target]]]:
    """Lazily built targets, one per budget (built just before it runs, so one is loaded at a time)."""
    from vtprune.bench.targets import OrtTarget, TorchTarget, TrtTarget

    if cfg.backend == "trt":
        for budget, bundle in ort_bundles(cfg, log):
            yield budget, lambda b=bundle: TrtTarget(b)
        return
    if cfg.backend == "ort":
        for budget, bundle in ort_bundles(cfg, log):
            yield budget, lambda b=bundle: OrtTarget(b, cfg.provider, cfg.threads, cfg.prefix_cache)
        return
    from vtprune.models import load_vlm

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    adapter = load_vlm(str(cfg.model), cfg.dtype, cache_dir=cfg.cache_dir, device=cfg.device)
    for budget in cfg.budgets:
        prune = budget.prune_config(cfg.method)
        yield budget, lambda p=prune: TorchTarget(adapter, p, str(cfg.model), cfg.dtype, cfg.threads)


# --- measuring ---------------------------------------------------------------------------------------
class GpuMemory:
    """Peak GPU memory where torch sees a CUDA device: the allocator's peak for the PyTorch backend, the
    device-wide used memory sampled after every run for ONNX Runtime (whose arena torch cannot see)."""

    def __init__(self, backend: str) -> None:
        self.backend, self.samples = backend, []
        self.torch = _cuda_torch()
        if self.torch is not None:
            self.torch.cuda.reset_peak_memory_stats()

    def sample(self) -> None:
        if self.torch is not None and self.backend == "ort":
            free, total = self.torch.cuda.mem_get_info()
            self.samples.append((total - free) / 2**20)

    def result(self) -> dict[str, Any]:
        if self.torch is None:
            return {"peak_gpu_mb": None, "gpu_method": None}
        if self.backend == "torch":
            return {"peak_gpu_mb": self.torch.cuda.max_memory_allocated() / 2**20,
                    "gpu_method": "torch.cuda.max_memory_allocated"}  # fmt: skip
        return {"peak_gpu_mb": max(self.samples, default=None),
                "gpu_method": "device used (mem_get_info) after each run"}  # fmt: skip


def _cuda_torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def bench_budget(target: Target, samples: list[Sample], cfg: BenchConfig, tick: Callable[[], None]) -> dict:
    """Warm-up and timed runs of one target, cycling through ``samples``; stats per stage plus run info."""
    infos: list[Generation] = []
    gpu = GpuMemory(target.backend)
    state = {"i": 0}

    def once() -> dict[str, float]:
        sample = samples[state["i"] % len(samples)]
        state["i"] += 1
        ms, info = target.run(sample, cfg.new_tokens)
        infos.append(info)
        return stage_metrics(ms, info)

    def after() -> None:
        gpu.sample()
        tick()

    stats = measure_stages(once, cfg.warmup, cfg.iters, after)
    return {"stats": stats, "infos": infos[cfg.warmup:], "memory": gpu.result()}


# report token key -> ``Generation`` field
TOKEN_FIELDS = {"visual_total": "visual_tokens_total", "visual_kept": "visual_tokens_kept", "prompt": "prompt_tokens",
                "prefill": "prefill_tokens", "cached": "cached_tokens", "decode_steps": "decode_steps"}  # fmt: skip


def _median_int(values: list[int]) -> int:
    return int(statistics.median_low(values))


def budget_entry(budget: Budget, target: Target, measured: dict, rss_scope: str) -> dict[str, Any]:
    """The report's entry for one budget (see docs/report_schema.md)."""
    infos: list[Generation] = measured["infos"]
    stats: dict[str, Timing] = measured["stats"]
    tokens = {k: _median_int([getattr(i, field) for i in infos]) for k, field in TOKEN_FIELDS.items()}
    tokens["visual_pruned"] = tokens["visual_total"] - tokens["visual_kept"]
    flops = min(infos, key=lambda i: abs(i.prefill_tokens - tokens["prefill"])).flops.to_dict()
    flops["prefill_flops"] = 2 * flops["prefill_macs_pruned"]
    stages = {k: {s: getattr(t, s) for s in STAT_KEYS} for k, t in stats.items()}
    return {"label": budget.label, "keep": budget.keep, "prune": target.cfg.to_dict(),
            "bundle": target.subject()["bundle"], "bundle_fingerprint": target.subject()["bundle_fingerprint"],
            "tokens": tokens, "flops": flops, "stages": stages, "throughput": throughput(stages, tokens),
            "memory": {"peak_rss_mb": peak_rss_mb(), "rss_scope": rss_scope, **measured["memory"]},
            "varies_across_images": len({(i.visual_tokens_total, i.prefill_tokens) for i in infos}) > 1}  # fmt: skip


def throughput(stages: dict[str, dict], tokens: dict[str, int]) -> dict[str, float | None]:
    """Edge-LLM's vocabulary at the median: ViT tok/s (image tokens), prefill tok/s (rows computed: the
    prefix cache's rows are not), decode tok/s."""

    def rate(count: int, stage: str) -> float | None:
        ms = stages.get(stage, {}).get("p50_ms")
        return count / (ms / 1e3) if ms and count else None

    return {"vision_tok_per_s": rate(tokens["visual_total"], "vision_prune"),
            "prefill_tok_per_s": rate(tokens["prefill"] - tokens.get("cached", 0), "prefill"),
            "decode_tok_per_s": rate(1, "decode_per_token")}  # fmt: skip


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=not enabled, unit="run", dynamic_ncols=True, leave=False)


def run_bench(cfg: BenchConfig, log: Log | None = None, argv: list[str] | None = None) -> dict[str, Any]:
    """Benchmark every budget of ``cfg`` and return the report (nothing is written here)."""
    log = log or _stderr
    samples = load_samples(cfg.images, cfg.dataset, cfg.prompt, cfg.num_images)
    plan = list(targets(cfg, log))  # exports (if any) happen here, before timing starts
    entries, subject = [], None
    bar = _progress(len(plan) * (cfg.warmup + cfg.iters), not cfg.no_progress)
    with background_load(cfg.background_load):
        try:
            for budget, build in plan:
                gc.collect()
                scope = "budget" if reset_peak_rss() else "process"
                bar.set_description(f"budget {budget.label}")
                target = build()
                measured = bench_budget(target, samples, cfg, lambda: bar.update(1))
                entries.append(budget_entry(budget, target, measured, scope))
                subject = subject or target.subject() | {"method": _method(target.cfg, cfg)}
                target.close()
                del target
        finally:
            bar.close()
    return assemble(cfg, subject, entries, samples, argv)


def _method(prune: PruneConfig, cfg: BenchConfig) -> str:
    return prune.method if prune.prunes else cfg.method


def common_prune(entries: list[dict]) -> dict[str, Any]:
    """G-Prune settings shared by every pruned budget (keep and method excluded)."""
    pruned = [e["prune"] for e in entries if e["prune"]["method"] != "none"]
    keys = ("theta", "tau", "iters", "degree", "positions")
    return {k: pruned[0][k] for k in keys if all(p[k] == pruned[0][k] for p in pruned)} if pruned else {}


def notes_for(subject: dict[str, Any], extra: tuple[str, ...] = ()) -> list[str]:
    from vtprune.models.tiny import TINY_MODELS

    notes = [TINY_NOTE.format(model=subject["model"])] if subject["model"] in TINY_MODELS else []
    return notes + list(extra)


def assemble(
    cfg: BenchConfig, subject: dict, entries: list[dict], samples: list[Sample], argv: list[str] | None
) -> dict[str, Any]:
    """The report dict: header, subject, workload, environment, budgets."""
    subject = {k: v for k, v in subject.items() if k not in ("bundle", "bundle_fingerprint")}
    subject["prune"] = common_prune(entries)
    from vtprune.backends.ort import PROVIDERS

    provider = {"torch": f"torch-{cfg.device}", "trt": "tensorrt"}.get(cfg.backend,
                                                                     f"onnxruntime:{PROVIDERS[cfg.provider]}")
    workload = describe(samples, cfg.images, cfg.dataset) | {
        "new_tokens": cfg.new_tokens, "eos_ignored": True, "warmup": cfg.warmup, "iters": cfg.iters,
        "background_load": cfg.background_load,
        "iteration_order": "runs cycle through the images; warm-up runs are discarded"}  # fmt: skip
    report = {
        "schema_version": SCHEMA_VERSION, "kind": KIND, "predicted": False,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "vtprune_version": __version__, "command": argv, "config": cfg.to_dict(), "subject": subject,
        "workload": workload, "environment": environment(provider, subject["precision"]),
        "budgets": entries, "notes": notes_for(subject, cfg.notes),
    }  # fmt: skip
    return validate_report(report)
