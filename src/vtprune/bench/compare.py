"""``vtprune compare``: reports side by side, ratios per stage against the first, refusal of
apples-to-oranges comparisons, and what differs between the environments.

Refused without ``force`` (they measure different things): another model, pruning method or G-Prune
settings, another set of budgets, another bundle at the same budget, another workload (images, prompt,
decode length, or prefill length at a budget). Allowed and listed (that is what one compares): backend,
provider, precision, threads, machine, library versions, and predicted against measured.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from vtprune.bench.markdown import STAGE_TITLES, environment_lines, fmt_ms, table
from vtprune.bench.schema import COMPARE_FILE, COMPARE_KIND, SCHEMA_VERSION, STAGES, ComparisonError, dumps

SUBJECT_ALLOWED = ("backend", "provider", "precision", "threads", "prefix_cache")


def refusals(reports: list[dict[str, Any]]) -> list[str]:
    """Why these reports do not measure the same thing (empty when they do)."""
    base, out = reports[0], []
    for i, r in enumerate(reports[1:], 1):
        tag = f"report {i + 1} vs report 1"
        for key in ("model", "model_type", "method", "prune"):
            if r["subject"].get(key) != base["subject"].get(key):
                out.append(f"{tag}: {key} {r['subject'].get(key)!r} != {base['subject'].get(key)!r}")
        if _labels(r) != _labels(base):
            out.append(f"{tag}: budgets {', '.join(_labels(r))} != {', '.join(_labels(base))}")
            continue
        out += _budget_refusals(tag, base, r)
        for key in ("images", "sources", "prompt", "new_tokens"):
            if r["workload"].get(key) != base["workload"].get(key):
                out.append(f"{tag}: workload {key} {r['workload'].get(key)!r} != {base['workload'].get(key)!r}")
    return out


def _labels(report: dict[str, Any]) -> list[str]:
    return sorted(b["label"] for b in report["budgets"])


def _budget_refusals(tag: str, base: dict, other: dict) -> list[str]:
    out, by_label = [], {b["label"]: b for b in base["budgets"]}
    for b in other["budgets"]:
        a = by_label[b["label"]]
        fa, fb = a.get("bundle_fingerprint"), b.get("bundle_fingerprint")
        if fa and fb and fa != fb:
            out.append(f"{tag}: budget {b['label']} ran different bundles ({fb} != {fa})")
        if a["tokens"]["prefill"] != b["tokens"]["prefill"]:
            got, want = b["tokens"]["prefill"], a["tokens"]["prefill"]
            out.append(f"{tag}: budget {b['label']} prefills {got} tokens, not {want}")
    return out


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def differences(reports: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Keys whose values differ across reports: subject fields and the flattened environment."""

    def diff(blocks: list[dict]) -> list[dict[str, Any]]:
        flat = [flatten(b) for b in blocks]
        keys = list(dict.fromkeys(k for f in flat for k in f))
        return [{"key": k, "values": [f.get(k) for f in flat]} for k in keys if len({repr(f.get(k)) for f in flat}) > 1]

    env = [r["environment"] | ({"predicted_for": r["device"]["name"]} if r["predicted"] else {}) for r in reports]
    subject = [{k: r["subject"].get(k) for k in SUBJECT_ALLOWED} | {"predicted": r["predicted"]} for r in reports]
    return {"subject": diff(subject), "environment": diff(env)}


def ratio(base: float | None, value: float | None) -> float | None:
    return value / base if base and value is not None else None


def aligned(reports: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Budget entries row by row: by label when the budget sets match, else (forced) by position."""
    if all(_labels(r) == _labels(reports[0]) for r in reports):
        index = [{b["label"]: b for b in r["budgets"]} for r in reports]
        return [[idx[b["label"]] for idx in index] for b in reports[0]["budgets"]]
    return [list(row) for row in zip(*(r["budgets"] for r in reports), strict=False)]


def compare_row(entries: list[dict[str, Any]], predicted: list[bool]) -> dict[str, Any]:
    """p50 per stage for each report, its ratio to the first, and prediction error where the report and
    the baseline are one predicted and one measured (error = predicted / measured - 1, in percent)."""
    stages = {}
    for stage in STAGES:
        p50 = [_p50(e, stage) for e in entries]
        if all(v is None for v in p50):
            continue
        row: dict[str, Any] = {"p50_ms": p50, "ratio": [ratio(p50[0], v) for v in p50]}
        if any(p != predicted[0] for p in predicted):
            pairs = [_pair_error(entries[0], e, predicted[0], p, stage)
                     for e, p in zip(entries, predicted, strict=True)]  # fmt: skip
            row["error_pct"] = [err for err, _ in pairs]
            if any(adjusted for _, adjusted in pairs):
                row["error_note"] = "measured minus its preprocess, as the prediction excludes preprocessing"
        stages[stage] = row
    labels = [e["label"] for e in entries]
    return {"budget": labels[0] if len(set(labels)) == 1 else " | ".join(labels), "labels": labels,
            "visual_kept": [e["tokens"]["visual_kept"] for e in entries],
            "prefill_tokens": [e["tokens"]["prefill"] for e in entries], "stages": stages}  # fmt: skip


def _p50(entry: dict[str, Any], stage: str) -> float | None:
    return (entry["stages"].get(stage) or {}).get("p50_ms")


def _pair_error(
    base: dict, other: dict, base_predicted: bool, predicted: bool, stage: str
) -> tuple[float | None, bool]:
    """(error %, adjusted) of the pair (baseline, other) when exactly one of them is predicted. A measured
    TTFT/e2e loses its preprocessing when the predicted side does not model it (``includes_preprocess``)."""
    if base_predicted == predicted:
        return None, False
    pred_entry, meas_entry = (base, other) if base_predicted else (other, base)
    pred, meas = _p50(pred_entry, stage), _p50(meas_entry, stage)
    if pred is None or not meas:
        return None, False
    excluded = (pred_entry["stages"].get(stage) or {}).get("includes_preprocess") is False
    pre = _p50(meas_entry, "preprocess")
    adjusted = stage in ("ttft", "e2e") and excluded and pre is not None
    meas = meas - pre if adjusted else meas
    return ((pred / meas - 1) * 100 if meas > 0 else None), adjusted


def default_labels(reports: list[dict[str, Any]]) -> list[str]:
    labels = []
    for r in reports:
        s = r["subject"]
        where = f"predicted:{r['device']['name']}" if r["predicted"] else r["environment"].get("host", "?")
        labels.append(f"{where} {s['backend']}/{s.get('provider')} {s.get('precision')}")
    return [lab if labels.count(lab) == 1 else f"{lab} #{i + 1}" for i, lab in enumerate(labels)]


def compare_reports(
    reports: list[dict[str, Any]], paths: list[str], labels: list[str] | None = None, force: bool = False
) -> dict[str, Any]:
    """The comparison of validated ``reports`` (the first is the baseline); refuses unless ``force``."""
    reasons = refusals(reports)
    if reasons and not force:
        more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        msg = f"these reports measure different things: {reasons[0]}{more}; pass --force to compare anyway"
        raise ComparisonError(msg)
    labels = labels or default_labels(reports)
    predicted = [r["predicted"] for r in reports]
    return {
        "schema_version": SCHEMA_VERSION, "kind": COMPARE_KIND,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "forced": bool(reasons), "refusals": reasons,
        "reports": [{"label": lab, "path": p, "predicted": r["predicted"], "subject": r["subject"],
                     "device": r.get("device", {}).get("name"), "host": r["environment"].get("host")}
                    for lab, p, r in zip(labels, paths, reports, strict=True)],
        "differences": differences(reports),
        "budgets": [compare_row(row, predicted) for row in aligned(reports)],
    }  # fmt: skip


# --- output ------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:+.0f}%"


def compare_markdown(comparison: dict[str, Any], reports: list[dict[str, Any]]) -> str:
    labels = [r["label"] for r in comparison["reports"]]
    lines = [f"# Comparison: {' vs '.join(labels)}", ""]
    if comparison["forced"]:
        lines += ["> **Compared with --force although the reports differ:** " + "; ".join(comparison["refusals"]), ""]
    rows = [[r["label"], "predicted" if r["predicted"] else "measured", f"`{r['subject']['model']}`",
             f"{r['subject']['backend']}/{r['subject'].get('provider')}/{r['subject'].get('precision')}",
             r["device"] or r["host"] or "?", f"`{r['path']}`"] for r in comparison["reports"]]  # fmt: skip
    lines += table(["label", "kind", "model", "backend/provider/precision", "machine", "report"], rows) + [""]
    lines += [f"Ratios are each report's p50 over **{labels[0]}**'s (< 1 is faster)."]
    if any("error_pct" in s for b in comparison["budgets"] for s in b["stages"].values()):
        lines += ["Error is predicted / measured - 1 (positive: the prediction is slower than the measurement)."]
    for b in comparison["budgets"]:
        lines += ["", f"## Budget {b['budget']} (visual tokens kept: {', '.join(map(str, b['visual_kept']))})", ""]
        lines += stage_rows(b, labels)
    lines += ["", "## What differs", ""] + difference_lines(comparison, labels)
    for label, r in zip(labels, reports, strict=True):
        lines += ["", f"### Environment of {label}", ""] + environment_lines(r["environment"])
    return "\n".join(lines) + "\n"


def stage_rows(row: dict[str, Any], labels: list[str]) -> list[str]:
    has_err = any("error_pct" in s for s in row["stages"].values())
    header = ["stage"] + [f"{lab} p50 ms" for lab in labels] + [f"{lab} / {labels[0]}" for lab in labels[1:]]
    header += [f"{lab} error" for lab in labels[1:]] if has_err else []
    rows = []
    for stage, s in row["stages"].items():
        cells = [STAGE_TITLES[stage]] + [fmt_ms(v) for v in s["p50_ms"]]
        cells += [f"{r:.3g}" if r is not None else "–" for r in s["ratio"][1:]]
        cells += [_pct(e) for e in s.get("error_pct", [None] * len(labels))[1:]] if has_err else []
        rows.append(cells)
    notes = sorted({s["error_note"] for s in row["stages"].values() if "error_note" in s})
    return table(header, rows) + [line for n in notes for line in ("", f"TTFT and end-to-end errors: {n}.")]


def difference_lines(comparison: dict[str, Any], labels: list[str]) -> list[str]:
    diffs = comparison["differences"]["subject"] + comparison["differences"]["environment"]
    if not diffs:
        return ["Nothing in the subjects or environments differs."]
    rows = [[f"`{d['key']}`"] + [str(v) if v is not None else "–" for v in d["values"]] for d in diffs]
    return table(["key", *labels], rows)


def write_comparison(comparison: dict[str, Any], reports: list[dict[str, Any]], out: Path, force: bool) -> list[str]:
    from vtprune.bench import plots
    from vtprune.bench.schema import text_writer, write_dir

    writers = {COMPARE_FILE: text_writer(dumps(comparison)),
               "compare.md": text_writer(compare_markdown(comparison, reports))}  # fmt: skip
    if plots.available():
        writers["compare.png"] = lambda path: plots.compare_stages(comparison, path)
    return write_dir(out, writers, force, kind="comparison")
