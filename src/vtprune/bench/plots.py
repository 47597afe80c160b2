"""PNG plots of reports with matplotlib's object API (no pyplot global state; Agg canvas).

``latency_vs_budget``: p50 per stage against kept visual tokens (p90 whiskers when measured).
``stage_breakdown``: stacked mean stage times per budget (means add up: the rest of e2e is "other").
``compare_stages``: p50 per stage and budget, one bar per report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vtprune.bench.markdown import STAGE_TITLES, SUMMARY_STAGES

STACK = ("preprocess", "vision", "prune", "vision_prune", "embed", "prefill", "decode")
COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974")


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _subtitle(report: dict[str, Any]) -> str:
    s = report["subject"]
    kind = "predicted" if report["predicted"] else "measured"
    where = report.get("device", {}).get("name") or report["environment"].get("cpu")
    return f"{s['model']} · {s['backend']} {s.get('provider')} {s.get('precision')} · {kind} on {where}"


def latency_vs_budget(report: dict[str, Any], path: Path) -> None:
    fig = _figure(12, 6.5)
    stages = [s for s in SUMMARY_STAGES if any(s in b["stages"] for b in report["budgets"])]
    axes = fig.subplots(2, 3).ravel()
    budgets = sorted(report["budgets"], key=lambda b: b["tokens"]["visual_kept"])
    x = [b["tokens"]["visual_kept"] for b in budgets]
    for ax, stage in zip(axes, stages, strict=False):
        pts = [(xi, b["stages"][stage], b["label"]) for xi, b in zip(x, budgets, strict=True) if stage in b["stages"]]
        ys = [st["p50_ms"] for _, st, _ in pts]
        err = [max(0.0, (st.get("p90_ms") or st["p50_ms"]) - st["p50_ms"]) for _, st, _ in pts]
        ax.errorbar([p[0] for p in pts], ys, yerr=[[0] * len(err), err], marker="o", capsize=3, color=COLORS[0])
        for (xi, _, label), y in zip(pts, ys, strict=True):
            ax.annotate(label, (xi, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(STAGE_TITLES[stage] + (" (ms/token)" if stage == "decode_per_token" else " (ms)"), fontsize=10)
        ax.set_xlabel("visual tokens kept", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.margins(x=0.12)
        ax.grid(alpha=0.3)
    for ax in axes[len(stages):]:
        ax.set_visible(False)
    whiskers = "" if report["predicted"] else ", whiskers to p90"
    fig.suptitle(f"Latency vs budget (p50{whiskers})\n{_subtitle(report)}", fontsize=10)
    fig.savefig(path)


def stage_breakdown(report: dict[str, Any], path: Path) -> None:
    fig = _figure(9, 5)
    ax = fig.subplots()
    budgets = report["budgets"]
    labels = [b["label"] for b in budgets]
    bottom = [0.0] * len(budgets)
    for color, stage in zip(COLORS, (*STACK, "other"), strict=False):
        vals = [_mean(b, stage) for b in budgets]
        if not any(vals):
            continue
        ax.bar(labels, vals, bottom=bottom, label=STAGE_TITLES.get(stage, stage), color=color)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xlabel("budget (visual tokens kept)")
    ax.set_ylabel("mean ms per request")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Stage breakdown of end-to-end latency (means; 'other' = glue between stages)\n{_subtitle(report)}",
                 fontsize=10)  # fmt: skip
    fig.savefig(path)


def _mean(entry: dict[str, Any], stage: str) -> float:
    stages = entry["stages"]
    if stage == "vision_prune" and "vision" in stages:
        return 0.0  # PyTorch reports stack vision and prune separately
    if stage == "other":
        if "e2e" not in stages:
            return 0.0
        parts = sum(_mean(entry, s) for s in STACK)
        return max(0.0, (stages["e2e"].get("mean_ms") or stages["e2e"]["p50_ms"]) - parts)
    st = stages.get(stage)
    return 0.0 if st is None else st.get("mean_ms") or st["p50_ms"]


def compare_stages(comparison: dict[str, Any], path: Path) -> None:
    """Grouped bars: for each stage a panel, budgets on x, one bar per report (p50)."""
    fig = _figure(12, 6.5)
    axes = fig.subplots(2, 3).ravel()
    labels = [r["label"] for r in comparison["reports"]]
    rows = comparison["budgets"]
    width = 0.8 / len(labels)
    for ax, stage in zip(axes, SUMMARY_STAGES, strict=False):
        for j, (label, color) in enumerate(zip(labels, COLORS, strict=False)):
            ys = [(row["stages"].get(stage) or {}).get("p50_ms", [None] * len(labels))[j] or 0 for row in rows]
            ax.bar([i + j * width for i in range(len(rows))], ys, width, label=label, color=color)
        ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(rows))], [r["budget"] for r in rows],
                      fontsize=7)  # fmt: skip
        ax.set_title(STAGE_TITLES[stage] + " p50 (ms)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Comparison (first report is the baseline of every ratio)", fontsize=10)
    fig.savefig(path)
