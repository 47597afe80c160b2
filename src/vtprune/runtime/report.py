"""The one timing primitive for benchmarks, and the environment block every result carries."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    """Wall-clock statistics of repeated calls, in milliseconds."""

    warmup: int
    iters: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def measure(fn: Callable[[], Any], warmup: int = 3, iters: int = 20, sync: Callable[[], None] | None = None) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``iters`` times timed (``sync`` after each, e.g. CUDA)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=100, method="inclusive") if len(samples) > 1 else samples * 99
    return Timing(warmup, iters, statistics.median(samples), q[89], q[98], statistics.fmean(samples), min(samples))


def environment() -> dict[str, Any]:
    """Host, CPU, accelerator and library versions, so a number can be traced to where it ran."""
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    packages = ("vtprune", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu")
    packages += ("tensorrt", "tensorrt-rtx")
    for pkg in packages:
        try:
            libs[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return {"host": platform.node(), "os": platform.platform(), "python": platform.python_version(),
            "cpu": _cpu_model(), "cores": os.cpu_count(), "gpu": _gpu_name(), "libraries": libs}  # fmt: skip


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None
