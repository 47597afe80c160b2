"""Report schema round trip, validation errors, and the files a report directory holds."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import make_report, variant
from vtprune.bench.output import write_report
from vtprune.bench.schema import ReportError, dumps, load_report, validate_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_round_trips_through_json(tmp_path):
    report = make_report()
    write_report(report, tmp_path / "r")
    assert load_report(tmp_path / "r") == report
    assert load_report(tmp_path / "r" / "report.json") == json.loads(dumps(report))


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        ("schema_version", 2, "schema_version 2"),
        ("kind", "other", "kind is 'other'"),
        ("budgets", [], "has no budgets"),
        ("subject.model", None, "subject.model"),
        ("workload.iters", "ten", "workload.iters"),
        ("budgets.0.stages.prefill.p90_ms", None, "stages.prefill.p90_ms"),
        ("budgets.0.stages.warp", {"p50_ms": 1.0}, "unknown stage 'warp'"),
        ("budgets.1.label", "all", "repeats a budget label"),
        ("budgets.0.tokens.visual_kept", None, "tokens.visual_kept"),
    ],
)
def test_validation_names_the_first_problem(path, value, fragment):
    with pytest.raises(ReportError, match=fragment):
        validate_report(variant(make_report(), **{path: value}))


def test_predicted_reports_may_leave_percentiles_empty():
    validate_report(make_report(predicted=True))
    with pytest.raises(ReportError, match="p90_ms"):
        validate_report(make_report(predicted=False) | {"budgets": make_report(predicted=True)["budgets"]})


def test_report_dir_has_json_markdown_and_plots(tmp_path):
    report = make_report(**{"model": "tiny-llava"}) | {"notes": ["pipeline check only"]}
    files = write_report(report, tmp_path / "r")
    assert files == ["latency_vs_budget.png", "report.json", "report.md", "stage_breakdown.png"]
    for png in ("latency_vs_budget.png", "stage_breakdown.png"):
        data = (tmp_path / "r" / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.startswith("# Measured latency: tiny-llava") and "pipeline check only" in md
    assert "| all | 64 / 64 | 75 |" in md and "## Environment" in md and "Jetson: no" in md


def test_existing_out_needs_force_and_other_dirs_are_never_replaced(tmp_path):
    report = make_report()
    write_report(report, tmp_path / "r")
    with pytest.raises(ReportError, match="--force"):
        write_report(report, tmp_path / "r")
    write_report(variant(report, **{"notes": ["second"]}), tmp_path / "r", force=True)
    assert load_report(tmp_path / "r")["notes"] == ["second"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(ReportError, match="not a vtprune report directory"):
        write_report(report, tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "r"], "temp dirs left behind"


def test_a_failing_writer_leaves_nothing_behind(tmp_path, monkeypatch):
    import vtprune.bench.plots as plots

    def boom(report, path):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plots, "stage_breakdown", boom)
    monkeypatch.setitem(__import__("vtprune.bench.output", fromlist=["x"]).PLOT_FILES, "stage_breakdown.png", boom)
    with pytest.raises(RuntimeError):
        write_report(make_report(), tmp_path / "r")
    assert list(tmp_path.iterdir()) == []


def test_report_dir_gets_ordinary_permissions(tmp_path):
    import os
    import stat

    write_report(make_report(), tmp_path / "r")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "r").stat().st_mode) == 0o777 & ~mask
