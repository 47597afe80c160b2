"""Latency reports: ``vtprune bench`` (measure), ``vtprune predict`` (roofline model for devices you do
not have) and ``vtprune compare`` (side by side). Reports follow one JSON schema (docs/report_schema.md).

Python API (heavy imports happen inside the functions)::

    from vtprune.bench import BenchConfig, parse_budgets, run_bench, write_report

    cfg = BenchConfig(model="tiny-llava-next", budgets=parse_budgets("all,32,16"), out=Path("report"))
    write_report(run_bench(cfg), cfg.out)
"""

from __future__ import annotations

from typing import Any

from vtprune.bench.config import BenchConfig, Budget, CompareConfig, PredictConfig, parse_budgets


def run_bench(cfg: BenchConfig, **kwargs: Any) -> dict[str, Any]:
    from vtprune.bench.run import run_bench as _run

    return _run(cfg, **kwargs)


def run_predict(cfg: PredictConfig, **kwargs: Any) -> dict[str, Any]:
    from vtprune.bench.predict import run_predict as _run

    return _run(cfg, **kwargs)


def write_report(report: dict[str, Any], out: Any, force: bool = False) -> list[str]:
    from vtprune.bench.output import write_report as _write

    return _write(report, out, force)


__all__ = ["BenchConfig", "Budget", "CompareConfig", "PredictConfig", "parse_budgets", "run_bench", "run_predict",
           "write_report"]  # fmt: skip
