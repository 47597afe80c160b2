"""The latency report format (``report.json``, schema v1; documented in docs/report_schema.md), its
validation, and atomic writing of report directories.

A report is plain JSON: ``bench`` writes measured ones, ``predict`` predicted ones (``"predicted": true``),
``compare`` reads any number of either. Validation checks structure and types, not plausibility.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vtprune import outputs
from vtprune.errors import ComparisonError, ReportError  # noqa: F401  (re-exported for callers)
from vtprune.files import read_json

SCHEMA_VERSION = 1
KIND = "vtprune-latency-report"
COMPARE_KIND = "vtprune-latency-compare"
REPORT_FILE = "report.json"
COMPARE_FILE = "compare.json"

# Stages in pipeline order. ``vision_prune`` is the vision encoder plus pruning (one graph on ONNX
# Runtime); PyTorch reports also have ``vision`` and ``prune`` separately. ``ttft`` = ``e2e`` - ``decode``.
STAGES = ("preprocess", "vision", "prune", "vision_prune", "embed", "prefill", "ttft", "decode",
          "decode_per_token", "e2e")  # fmt: skip
STAT_KEYS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms")
TOKEN_KEYS = ("visual_total", "visual_kept", "visual_pruned", "prompt", "prefill", "decode_steps")
FLOP_KEYS = ("prefill_macs_unpruned", "prefill_macs_pruned", "prune_stage_macs", "saved_fraction", "prefill_flops")


# --- validation ------------------------------------------------------------------------------------
def _require(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ReportError(f"{where}: {msg}")


def _is_num(value: Any, optional: bool = False) -> bool:
    if value is None:
        return optional
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_report(report: Any, where: str = "report") -> dict[str, Any]:
    """``report`` if it is a schema-v1 latency report, else ``ReportError`` naming the first problem."""
    _require(isinstance(report, dict), where, "is not a JSON object")
    _require(report.get("kind") == KIND, where, f"kind is {report.get('kind')!r}, not {KIND!r}")
    version = report.get("schema_version")
    _require(version == SCHEMA_VERSION, where, f"schema_version {version!r}; this vtprune reads {SCHEMA_VERSION}")
    for key, typ in (("predicted", bool), ("subject", dict), ("workload", dict), ("environment", dict),
                     ("budgets", list), ("notes", list), ("config", dict)):  # fmt: skip
        _require(isinstance(report.get(key), typ), where, f"'{key}' must be a {typ.__name__}")
    _require(len(report["budgets"]) > 0, where, "has no budgets")
    for key in ("backend", "model", "method"):
        _require(isinstance(report["subject"].get(key), str), where, f"subject.{key} must be a string")
    for key in ("warmup", "iters", "new_tokens"):
        _require(_is_num(report["workload"].get(key)), where, f"workload.{key} must be a number")
    budgets = enumerate(report["budgets"])
    labels = [_validate_budget(b, f"{where}: budgets[{i}]", report["predicted"]) for i, b in budgets]
    _require(len(set(labels)) == len(labels), where, "repeats a budget label")
    return report


def _validate_budget(entry: Any, where: str, predicted: bool) -> str:
    _require(isinstance(entry, dict), where, "is not an object")
    _require(isinstance(entry.get("label"), str), where, "label must be a string")
    for key in ("tokens", "flops", "stages", "throughput", "memory"):
        _require(isinstance(entry.get(key), dict), where, f"'{key}' must be an object")
    for key in TOKEN_KEYS:
        _require(_is_num(entry["tokens"].get(key), optional=key == "decode_steps"), where, f"tokens.{key} missing")
    for key in FLOP_KEYS:
        _require(_is_num(entry["flops"].get(key)), where, f"flops.{key} must be a number")
    for name, stats in entry["stages"].items():
        _require(name in STAGES, where, f"unknown stage {name!r} (known: {', '.join(STAGES)})")
        _require(isinstance(stats, dict) and _is_num(stats.get("p50_ms")), where, f"stages.{name}.p50_ms missing")
        for key in STAT_KEYS:
            _require(_is_num(stats.get(key), optional=predicted), where, f"stages.{name}.{key} must be a number")
    return entry["label"]


# --- reading ------------------------------------------------------------------------------------------
def load_report(path: str | Path) -> dict[str, Any]:
    """A report from ``report.json`` or a directory holding one, validated."""
    p = Path(path)
    if p.is_dir():
        p = p / REPORT_FILE
    if not p.is_file():
        raise ReportError(f"{path}: no such report (expected a report.json or a directory holding one)")
    return validate_report(read_json(p, ReportError), str(p))


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def stage_p50(entry: dict[str, Any], stage: str) -> float | None:
    stats = entry["stages"].get(stage)
    return None if stats is None else stats.get("p50_ms")


# --- writing ------------------------------------------------------------------------------------------
def check_out_dir(out: Path, force: bool, kind: str = "report") -> None:
    """Refuse early (before any work) to overwrite ``out`` without ``force``, or ever to replace a
    directory that is not a vtprune report (``kind="comparison"``: comparison) directory."""
    outputs.check_target(out, kind, force, ReportError)


def write_dir(out: Path, writers: dict[str, Callable[[Path], None]], force: bool, kind: str = "report") -> list[str]:
    """Write each file with ``writers[name](path)`` into a report directory at ``out``, atomically (an old
    one is replaced only after every file was written)."""
    with outputs.atomic_dir(Path(out), kind, force, ReportError) as tmp:
        for name, write in writers.items():
            write(tmp / name)
    return sorted(writers)


def text_writer(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text, encoding="utf-8")
