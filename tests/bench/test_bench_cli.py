"""``vtprune bench`` end to end on tiny models, its reuse of exported bundles, and its user errors."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from tests.test_cli import assert_user_error, run_main, snapshot
from vtprune.bench.config import BenchConfig, CompareConfig, PredictConfig, parse_budgets
from vtprune.bench.schema import load_report
from vtprune.errors import ConfigError

MEASURED = {"preprocess", "vision_prune", "embed", "prefill", "ttft", "decode", "decode_per_token", "e2e"}


def test_bench_exports_per_budget_and_reports_every_stage(bench_run):
    report = load_report(bench_run["report"])
    assert sorted(p.name for p in bench_run["report"].iterdir()) == [
        ".vtprune-output", "latency_vs_budget.png", "report.json", "report.md", "stage_breakdown.png"]  # fmt: skip
    assert sorted(p.name for p in bench_run["work"].iterdir()) == ["gprune-k8", "none-all"]
    assert report["workload"]["warmup"] == 1 and report["workload"]["iters"] == 2
    want = {"backend": "ort", "model": "tiny-llava", "method": "gprune", "precision": "fp32", "prefix_cache": True}
    assert {k: report["subject"][k] for k in want} == want
    assert report["environment"]["execution_provider"] == "onnxruntime:CPUExecutionProvider"
    assert "tiny random-weight model" in report["notes"][0]
    full, pruned = report["budgets"]
    assert (full["label"], pruned["label"]) == ("all", "8")
    assert (full["tokens"]["visual_kept"], pruned["tokens"]["visual_kept"], pruned["tokens"]["visual_pruned"]) == (
        64, 8, 56)  # fmt: skip
    assert pruned["tokens"]["prefill"] == full["tokens"]["prefill"] - 56 and pruned["tokens"]["decode_steps"] == 3
    # timed runs follow the warm-up: the text before the image ("USER:") comes from the prefix cache
    assert full["tokens"]["cached"] == pruned["tokens"]["cached"] > 0
    assert pruned["flops"]["prefill_flops"] < full["flops"]["prefill_flops"]
    for entry in report["budgets"]:
        assert set(entry["stages"]) == MEASURED
        for stats in entry["stages"].values():
            assert 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
        assert entry["throughput"]["prefill_tok_per_s"] > 0 and entry["memory"]["peak_rss_mb"] > 0
        assert entry["bundle_fingerprint"]


def test_bench_reuses_exported_bundles_and_takes_bundle_paths(bench_run, cache_dir, capsys):
    work, root = bench_run["work"], bench_run["root"]
    argv = ["bench", "--model", "tiny-llava", "--budgets", "8", "--work-dir", str(work.parent), "--cache-dir",
            str(cache_dir), "--warmup", "0", "--iters", "1", "--no-progress", "--out", str(root / "again")]  # fmt: skip
    assert run_main(argv) == 0
    assert "reusing" in capsys.readouterr().err
    argv = ["bench", str(work / "gprune-k8"), str(work / "none-all"), "--warmup", "0", "--iters", "1",
            "--new-tokens", "4", "--no-progress", "--out", str(root / "paths")]  # fmt: skip
    assert run_main(argv) == 0
    first, second = load_report(bench_run["report"]), load_report(root / "paths")
    assert [b["label"] for b in second["budgets"]] == ["8", "all"]
    assert {b["bundle_fingerprint"] for b in first["budgets"]} == {b["bundle_fingerprint"] for b in second["budgets"]}


def test_torch_backend_and_easy_vqa(cache_dir, tmp_path):
    pytest.importorskip("easy_vqa", reason="easy-vqa is not installed")
    argv = ["bench", "--backend", "torch", "--model", "tiny-llava-next", "--budgets", "all,25%", "--cache-dir",
            str(cache_dir), "--dataset", "easy-vqa", "--num-images", "2", "--warmup", "0", "--iters", "2",
            "--new-tokens", "3", "--no-progress", "--out", str(tmp_path / "r")]  # fmt: skip
    assert run_main(argv) == 0
    report = load_report(tmp_path / "r")
    assert report["subject"]["backend"] == "torch" and report["workload"]["images"] == "easy-vqa"
    assert report["workload"]["num_images"] == 2 and report["workload"]["sources"][0].startswith("easy-vqa:test:")
    assert [b["label"] for b in report["budgets"]] == ["all", "25%"]
    assert {"vision", "prune", "vision_prune"} <= set(report["budgets"][1]["stages"])


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--model", "tiny-llava", "--budgets", "all,abc"], ("--keep 'abc'",)),
        (["--model", "tiny-llava", "--budgets", "8,8"], ("repeats a budget",)),
        (["--model", "tiny-llava"], ("--model needs --budgets",)),
        (["--model", "tiny-llava", "--budgets", "8", "--iters", "0"], ("--iters 0",)),
        (["--backend", "torch", "--model", "tiny-llava", "--budgets", "8", "--provider", "cuda"], ("--provider cuda",)),
        (["--model", "tiny-llava", "--budgets", "8", "--images", "x", "--dataset", "easy-vqa"], ("not both",)),
        ([], ("nothing to benchmark",)),
        (["/no/such/bundle"], ("not a vtprune bundle",)),
    ],
)
def test_bench_user_errors_are_one_line_and_write_nothing(args, fragments, tmp_path, capsys):
    before = snapshot(tmp_path)
    rc = run_main(["bench", *args, "--out", str(tmp_path / "r"), "--no-progress"])
    out, err = capsys.readouterr()
    assert_user_error(rc, out, err, fragments)
    assert snapshot(tmp_path) == before


def test_existing_out_is_refused_before_any_work(bench_run, capsys):
    rc = run_main(["bench", str(bench_run["work"] / "none-all"), "--out", str(bench_run["report"])])
    assert_user_error(rc, *capsys.readouterr(), ("--force",))


@pytest.mark.parametrize("cls", [BenchConfig, CompareConfig, PredictConfig])
def test_every_config_field_is_one_flag(cls):
    from vtprune.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    name = {BenchConfig: "bench", CompareConfig: "compare", PredictConfig: "predict"}[cls]
    dests = {a.dest for a in sub.choices[name]._actions} - {"help"}
    assert dests == {f.name for f in dataclasses.fields(cls)}


def test_config_validation_names_the_bad_value():
    with pytest.raises(ConfigError, match="--warmup -1"):
        BenchConfig(model="m", budgets=parse_budgets("8"), warmup=-1)
    with pytest.raises(ConfigError, match="--device 'orin-mega'"):
        PredictConfig(bundles=("b",), device="orin-mega")
    with pytest.raises(ConfigError, match="--labels has 1 names for 2 reports"):
        CompareConfig(reports=("a", "b"), labels=("x",))
    assert [b.label for b in parse_budgets("all, 256,0.25,25%".replace("25%", "10%"))] == ["all", "256", "25%", "10%"]
