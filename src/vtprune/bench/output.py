"""Writing a report directory: ``report.json``, ``report.md`` and the PNG plots, atomically."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from vtprune.bench import plots
from vtprune.bench.markdown import report_markdown
from vtprune.bench.schema import REPORT_FILE, dumps, text_writer, validate_report, write_dir

PLOT_FILES = {"latency_vs_budget.png": plots.latency_vs_budget, "stage_breakdown.png": plots.stage_breakdown}


def warn_if_no_plots() -> None:
    if not plots.available():
        print("vtprune: warning: matplotlib is not installed, so no PNG plots will be written "
              "(pip install 'matplotlib==3.11.2')", file=sys.stderr)  # fmt: skip


def write_report(report: dict[str, Any], out: Path, force: bool = False) -> list[str]:
    """Write ``report`` (validated first) as a report directory at ``out``; returns the file names."""
    validate_report(report)
    writers = {REPORT_FILE: text_writer(dumps(report)), "report.md": text_writer(report_markdown(report))}
    if plots.available():
        writers |= {name: (lambda path, fn=fn: fn(report, path)) for name, fn in PLOT_FILES.items()}
    return write_dir(Path(out), writers, force)
