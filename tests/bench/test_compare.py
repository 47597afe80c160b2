"""compare: ratio math, prediction error, refusal rules, --force, environment differences, CLI."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import STAGES, make_report, variant
from tests.test_cli import assert_user_error, run_main
from vtprune.bench.compare import compare_reports
from vtprune.bench.output import write_report
from vtprune.bench.schema import ComparisonError


def times(**p50: float) -> dict[str, dict[str, float]]:
    return {"all": dict.fromkeys(STAGES, 10.0) | p50, "8": dict.fromkeys(STAGES, 4.0)}


def test_ratios_are_each_reports_p50_over_the_first():
    a = make_report(times(prefill=10.0, decode_per_token=2.0))
    b = variant(make_report(times(prefill=2.5, decode_per_token=3.0)), **{"environment.host": "orin"})
    c = make_report(times(prefill=20.0))
    cmp = compare_reports([a, b, c], ["a", "b", "c"], ["desk", "orin", "slow"])
    row = cmp["budgets"][0]
    assert row["budget"] == "all" and row["visual_kept"] == [64, 64, 64]
    assert row["stages"]["prefill"]["p50_ms"] == [10.0, 2.5, 20.0]
    assert row["stages"]["prefill"]["ratio"] == [1.0, 0.25, 2.0]
    assert row["stages"]["decode_per_token"]["ratio"] == [1.0, 1.5, 5.0]
    assert "error_pct" not in row["stages"]["prefill"]  # all measured: no prediction error
    assert [r["label"] for r in cmp["reports"]] == ["desk", "orin", "slow"] and not cmp["forced"]
    assert {"key": "host", "values": ["box", "orin", "box"]} in cmp["differences"]["environment"]


def test_prediction_error_is_predicted_over_measured_minus_one():
    measured = make_report(times(prefill=8.0, preprocess=2.0, ttft=12.0))
    predicted = make_report(times(prefill=6.0, ttft=7.0), predicted=True)
    for b in predicted["budgets"]:
        b["stages"].pop("preprocess")
        b["stages"]["ttft"]["includes_preprocess"] = False
    row = compare_reports([measured, predicted], ["m", "p"])["budgets"][0]
    assert row["stages"]["prefill"]["error_pct"] == [None, pytest.approx(-25.0)]
    assert row["stages"]["prefill"]["ratio"] == [1.0, 0.75]
    # the prediction excludes preprocessing, so TTFT is compared with measured TTFT minus preprocess (12 - 2)
    assert row["stages"]["ttft"]["error_pct"] == [None, pytest.approx(-30.0)] and "error_note" in row["stages"]["ttft"]
    back = compare_reports([predicted, measured], ["p", "m"])["budgets"][0]
    assert back["stages"]["prefill"]["error_pct"] == [None, pytest.approx(-25.0)]  # same sign either order


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"subject.model": "pocket"}, "model 'pocket'"),
        ({"subject.method": "fastv"}, "method 'fastv'"),
        ({"subject.prune": {"theta": 0.7}}, "prune"),
        ({"budgets.1.label": "16"}, "budgets"),
        ({"budgets.1.bundle_fingerprint": "other"}, "ran different bundles"),
        ({"budgets.0.tokens.prefill": 99}, "prefills 99 tokens"),
        ({"workload.prompt": "another question"}, "workload prompt"),
        ({"workload.new_tokens": 64}, "workload new_tokens"),
    ],
)
def test_apples_to_oranges_is_refused_unless_forced(change, fragment):
    a = make_report()
    b = variant(a, **change)
    with pytest.raises(ComparisonError, match=fragment):
        compare_reports([a, b], ["a", "b"])
    forced = compare_reports([a, b], ["a", "b"], force=True)
    assert forced["forced"] and any(fragment in r for r in forced["refusals"])


def test_allowed_differences_are_listed_not_refused():
    a = make_report()
    b = variant(a, **{"subject.backend": "torch", "subject.precision": "fp16", "environment.cpu": "cpu-b",
                      "environment.libraries": {"onnxruntime": "2"}})  # fmt: skip
    cmp = compare_reports([a, b], ["a", "b"])
    keys = {d["key"] for d in cmp["differences"]["subject"] + cmp["differences"]["environment"]}
    assert {"backend", "precision", "cpu", "libraries.onnxruntime"} <= keys and not cmp["forced"]


def test_forced_comparison_of_different_budgets_aligns_by_position():
    a = make_report({"all": dict.fromkeys(STAGES, 10.0)})
    b = make_report({"8": dict.fromkeys(STAGES, 4.0)})
    row = compare_reports([a, b], ["a", "b"], force=True)["budgets"][0]
    assert row["budget"] == "all | 8" and row["stages"]["e2e"]["ratio"] == [1.0, 0.4]


def test_cli_compare_writes_tables_and_plot(tmp_path, capsys):
    write_report(make_report(times(prefill=10.0)), tmp_path / "a")
    write_report(variant(make_report(times(prefill=5.0)), **{"environment.host": "orin"}), tmp_path / "b")
    out = tmp_path / "cmp"
    rc = run_main(["compare", str(tmp_path / "a"), str(tmp_path / "b" / "report.json"), "--out", str(out),
                   "--labels", "desktop,orin"])  # fmt: skip
    assert rc == 0
    assert "| prefill | 10.00 | 5.00 | 0.5 |" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [".vtprune-output", "compare.json", "compare.md", "compare.png"]
    data = json.loads((out / "compare.json").read_text())
    assert data["kind"] == "vtprune-latency-compare" and data["budgets"][0]["stages"]["prefill"]["ratio"][1] == 0.5
    md = (out / "compare.md").read_text()
    assert "# Comparison: desktop vs orin" in md and "| `host` | box | orin |" in md


def test_cli_compare_refusal_is_one_line_and_writes_nothing(tmp_path, capsys):
    write_report(make_report(), tmp_path / "a")
    write_report(make_report(model="pocket"), tmp_path / "b")
    rc = run_main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")])
    out, err = capsys.readouterr()
    assert_user_error(rc, out, err, ("--force", "pocket"))
    assert not (tmp_path / "cmp").exists()
    rc = run_main(["compare", str(tmp_path / "a"), str(tmp_path / "missing"), "--out", str(tmp_path / "cmp")])
    assert_user_error(rc, *capsys.readouterr(), ("no such report",))


def test_each_prediction_is_scored_against_the_measurement_on_its_own_terms():
    measured = make_report(times(preprocess=2.0, ttft=12.0))
    raw = make_report(times(ttft=5.0), predicted=True)
    calibrated = make_report(times(preprocess=2.0, ttft=11.0), predicted=True)
    for b in raw["budgets"]:
        b["stages"].pop("preprocess")
        b["stages"]["ttft"]["includes_preprocess"] = False
    for b in calibrated["budgets"]:
        b["stages"]["ttft"]["includes_preprocess"] = True
    ttft = compare_reports([measured, raw, calibrated], ["m", "p", "c"])["budgets"][0]["stages"]["ttft"]
    # raw: 5 vs 12 - 2 -> -50%; calibrated includes preprocessing: 11 vs 12 -> -8.3%
    assert ttft["error_pct"] == [None, pytest.approx(-50.0), pytest.approx(-100 / 12)]
