"""Fixtures for bench/compare/predict: synthetic reports (pure dicts) and one real tiny benchmark run.

``bench_run`` runs ``vtprune bench --model tiny-llava --budgets all,8`` once per session: it exports the
two bundles into a work dir (no validation, to stay fast), benchmarks them (1 warm-up, 2 iterations)
and leaves the report; later tests reuse both.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

STAGES = ("preprocess", "vision_prune", "embed", "prefill", "ttft", "decode", "decode_per_token", "e2e")


def stat(ms: float, predicted: bool = False) -> dict[str, Any]:
    if predicted:
        return {"p50_ms": ms, "mean_ms": ms, "p90_ms": None, "p99_ms": None, "min_ms": None}
    return {"p50_ms": ms, "p90_ms": ms * 1.1, "p99_ms": ms * 1.2, "mean_ms": ms * 1.05, "min_ms": ms * 0.9}


def budget(label: str, kept: int, times: dict[str, float], predicted: bool = False, fingerprint: str = "f0") -> dict:
    tokens = {"visual_total": 64, "visual_kept": kept, "visual_pruned": 64 - kept, "prompt": 75,
              "prefill": 11 + kept, "decode_steps": 7}  # fmt: skip
    flops = {"prefill_macs_unpruned": 1000, "prefill_macs_pruned": 10 * kept, "prune_stage_macs": 5,
             "saved_fraction": 0.5, "prefill_flops": 20 * kept}  # fmt: skip
    return {"label": label, "keep": None if label == "all" else int(label), "prune": {"method": "gprune"},
            "bundle": f"/b/{label}", "bundle_fingerprint": f"{fingerprint}-{label}", "tokens": tokens,
            "flops": flops, "stages": {k: stat(v, predicted) for k, v in times.items()},
            "throughput": {"prefill_tok_per_s": 1.0}, "memory": {"peak_rss_mb": 100.0}}  # fmt: skip


def make_report(times: dict[str, dict[str, float]] | None = None, predicted: bool = False, **subject: Any) -> dict:
    """A valid schema-v1 report; ``times[label][stage]`` are the p50s (defaults: two budgets)."""
    times = times or {"all": dict.fromkeys(STAGES, 10.0), "8": dict.fromkeys(STAGES, 5.0)}
    kept = {"all": 64}
    report = {
        "schema_version": 1, "kind": "vtprune-latency-report", "predicted": predicted, "created": "2026-01-01",
        "vtprune_version": "0.1.0", "command": None, "config": {},
        "subject": {"backend": "ort", "model": "tiny-llava", "family": "llava", "model_type": "llava",
                    "provider": "cpu", "threads": None, "precision": "fp32", "method": "gprune",
                    "prune": {"theta": 0.5}} | subject,
        "workload": {"images": "generated-scene", "sources": ["generated-scene"], "prompt": "q", "num_images": 1,
                     "image_sizes": [[320, 240]], "new_tokens": 8, "warmup": 1, "iters": 2},
        "environment": {"host": "box", "cpu": "cpu-a", "cores": 2, "gpu": None, "libraries": {"onnxruntime": "1"},
                        "execution_provider": "onnxruntime:CPUExecutionProvider", "precision": "fp32", "jetson": None},
        "budgets": [budget(lab, kept.get(lab, int(lab) if lab.isdigit() else 8), t, predicted)
                    for lab, t in times.items()],
        "notes": [],
    }  # fmt: skip
    if predicted:
        report["device"] = {"name": "cpu-host"}
    return report


def variant(report: dict, **changes: Any) -> dict:
    """A deep copy with dotted-path changes, e.g. ``variant(r, **{"subject.model": "x"})``."""
    out = copy.deepcopy(report)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = out
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[leaf] = value
    return out


@pytest.fixture(scope="session")
def bench_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """One real ``vtprune bench`` on tiny-llava (budgets all and 8): its work dir and report dir."""
    from vtprune.cli import main

    root = tmp_path_factory.mktemp("bench")
    work, out = root / "work", root / "report"
    argv = ["bench", "--model", "tiny-llava", "--budgets", "all,8", "--work-dir", str(work), "--cache-dir",
            str(cache_dir), "--no-validate", "--warmup", "1", "--iters", "2", "--new-tokens", "4", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return {"work": work / "tiny-llava", "report": out, "root": root}
