"""Benchmark targets: one loaded runner (``OrtVlm`` or ``PrunedVlm``) at one budget, run once per call.

Each run is ``runtime.generate``, timed by the runner's own ``StageTimer`` (plus an outer ``e2e`` stage);
decoding runs exactly ``new_tokens`` tokens with EOS ignored, as ``llm_bench``-style benchmarks do, so
every budget decodes the same length. ``stage_metrics`` turns one run's stage times into the report's stages.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

from vtprune.bench.schema import STAGES
from vtprune.bench.workload import Sample
from vtprune.config import PruneConfig
from vtprune.runtime.generate import Generation, generate


class Target(Protocol):
    backend: str
    cfg: PruneConfig

    def run(self, sample: Sample, new_tokens: int) -> tuple[dict[str, float], Generation]: ...

    def subject(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class OrtTarget:
    """A bundle on ONNX Runtime (``provider`` cpu | cuda | tensorrt)."""

    backend = "ort"

    def __init__(
        self, bundle: Path, provider: str = "cpu", threads: int | None = None, prefix_cache: bool = True
    ) -> None:
        from vtprune.backends.ort import OrtVlm

        self.bundle, self.provider, self.threads = Path(bundle), provider, threads
        self.vlm = OrtVlm(bundle, provider, threads, prefix_cache=prefix_cache)
        self.cfg = self.vlm.cfg

    def run(self, sample: Sample, new_tokens: int) -> tuple[dict[str, float], Generation]:
        return timed_run(self.vlm, sample, new_tokens)

    def subject(self) -> dict[str, Any]:
        m = self.vlm.manifest
        return {"backend": "ort", "model": m["model"]["source"], "family": m["model"]["family"],
                "model_type": m["model"]["model_type"], "provider": self.provider, "threads": self.threads,
                "precision": self.vlm.precision, "prefix_cache": self.vlm.prefix_cache, "bundle": str(self.bundle),
                "bundle_fingerprint": bundle_fingerprint(m)}  # fmt: skip

    def close(self) -> None:
        self.vlm = None  # type: ignore[assignment]


class TrtTarget(OrtTarget):
    """A bundle's TensorRT engines on the GPU (``vtprune build`` made them)."""

    backend = "trt"

    def __init__(self, bundle: Path) -> None:
        from vtprune.backends.trt.runner import TrtVlm

        self.bundle, self.provider, self.threads = Path(bundle), "tensorrt", None
        self.vlm = TrtVlm(bundle)
        self.cfg = self.vlm.cfg

    def subject(self) -> dict[str, Any]:
        engines = self.vlm.manifest.get("engines", {})
        return super().subject() | {"backend": "trt", "threads": None,
                                    "engines": {g: {k: e.get(k) for k in ("flavour", "trt_version", "target",
                                                                           "precision")} for g, e in engines.items()}}


class TorchTarget:
    """A checkpoint in PyTorch eager (on its weights' device) with a ``PruneConfig``; the adapter is shared
    across budgets."""

    backend = "torch"

    def __init__(self, adapter: Any, cfg: PruneConfig, model: str, dtype: str, threads: int | None = None) -> None:
        from vtprune.runtime.pipeline import PrunedVlm

        self.adapter, self.cfg, self.model, self.dtype, self.threads = adapter, cfg, model, dtype, threads
        self.vlm = PrunedVlm(adapter, cfg)
        self.device = str(self.vlm.device)

    def run(self, sample: Sample, new_tokens: int) -> tuple[dict[str, float], Generation]:
        return timed_run(self.vlm, sample, new_tokens)

    def subject(self) -> dict[str, Any]:
        return {"backend": "torch", "model": self.model, "family": self.adapter.family,
                "model_type": self.adapter.config.model_type, "provider": f"torch-{self.device}",
                "threads": self.threads,
                "precision": self.dtype, "bundle": None, "bundle_fingerprint": None}  # fmt: skip

    def close(self) -> None:
        self.vlm = None  # type: ignore[assignment]


def timed_run(runner: Any, sample: Sample, new_tokens: int) -> tuple[dict[str, float], Generation]:
    """One request through ``runner`` inside an ``e2e`` stage, decoding exactly ``new_tokens`` (no EOS)."""
    timer = runner.timer()
    with timer.stage("e2e"):
        gen = generate(runner, sample.image, sample.prompt, new_tokens, eos=set(), timer=timer)
    return dict(timer.ms), gen


def bundle_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 over the manifest's file digests: equal for copies of one bundle, whatever their path."""
    return hashlib.sha256(json.dumps(manifest.get("files", {}), sort_keys=True).encode()).hexdigest()[:16]


def stage_metrics(ms: dict[str, float], info: Generation) -> dict[str, float]:
    """One run's stage times -> the report's stages (``vision_prune``, ``ttft``, ``decode_per_token``)."""
    out = {k: v for k, v in ms.items() if k in ("preprocess", "vision", "prune", "embed", "prefill", "decode")}
    out["vision_prune"] = ms.get("vision", 0.0) + ms.get("prune", 0.0)
    if "prune" not in ms:
        out.pop("vision", None)  # one graph holds both: only the sum is a measured stage
    out["decode"] = ms.get("decode", 0.0)
    out["ttft"] = ms["e2e"] - out["decode"]
    if info.decode_steps > 0:
        out["decode_per_token"] = out["decode"] / info.decode_steps
    out["e2e"] = ms["e2e"]
    return {k: out[k] for k in STAGES if k in out}
