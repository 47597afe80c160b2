"""The predictor: roofline arithmetic by hand, graph counting, token substitution, calibration, and a
predicted report of real tiny bundles (cpu-host peaks faked so the test does not microbenchmark)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vtprune.bench import roofline as rl
from vtprune.bench.config import Budget, PredictConfig
from vtprune.bench.devices import DEVICES, Device
from vtprune.flops import TextDims, prefill_macs

# layers=1, d=4, m=8, heads=2, kv_heads=1, head_dim=2 -> d_q=4, d_kv=2; V=10
DIMS = TextDims(layers=1, hidden=4, intermediate=8, heads=2, kv_heads=1, head_dim=2, vocab=10)


def test_roofline_takes_the_larger_term_plus_overheads():
    work = rl.Work(flops=2e9, bytes=1e9, ops=10, runs=2, tensors=4)
    peaks = rl.Peaks(flops=1e12, bandwidth=1e11, eff_compute=0.5, eff_memory=0.5, op_overhead_s=1e-6,
                     run_overhead_s=1e-5, io_overhead_s=1e-6)  # fmt: skip
    est = rl.roofline(work, peaks)
    # compute 2e9 / 5e11 = 4 ms; memory 1e9 / 5e10 = 20 ms; overhead 10 us + 20 us + 4 us = 0.034 ms
    assert (est.compute_ms, est.memory_ms, est.overhead_ms) == pytest.approx((4.0, 20.0, 0.034))
    assert est.total_ms == pytest.approx(20.034) and est.bound == "memory"
    assert rl.roofline(rl.Work(1e9, 0.0, ops=10**6), rl.Peaks(1e12, 1e11, op_overhead_s=1e-6)).bound == "overhead"


def test_decoder_macs_by_hand():
    # prefill t = c = 3: 3*4*(2*4 + 2*2) + 2*3*3*4 + 3*3*4*8 = 144 + 72 + 288 = 504, + d*V = 40
    assert rl.decoder_macs(DIMS, 3, 3) == 544 == prefill_macs(DIMS, 3)
    # one decode step with 4 cached positions (c = 5): 48 + 40 + 96 + 40
    assert rl.decoder_macs(DIMS, 1, 5) == 224


def test_decoder_bytes_by_hand():
    # activations, t=1, c=5: 17*4 + 6*4 + 4*2 + 6*8 = 148, + 4*heads*t*c = 40; + final norm 2*t*d = 8 + V = 10
    assert rl.decoder_activation_elems(DIMS, 1, 5) == 206
    # KV: layers * 2 * kv_heads * head_dim * (t + c + past + c) = 4 * (1 + 5 + 4 + 5)
    assert rl.kv_cache_elems(DIMS, 1, 4) == 60
    fp16 = rl.decoder_work(DIMS, params=100, t=1, past=4, precision="fp16", ops=7, tensors=3)
    assert (fp16.flops, fp16.bytes, fp16.ops, fp16.runs, fp16.tensors) == (448.0, 100 * 2 + 206 * 2 + 60 * 2, 7, 1, 3)
    assert rl.decoder_work(DIMS, 100, 1, 4, "int8", 7).bytes == 100 * 1 + 206 * 2 + 60 * 2  # W8, FP16 between
    assert rl.decoder_work(DIMS, 100, 1, 4, "fp32", 7).bytes == 4 * (100 + 206 + 60)


def test_decode_sums_steps_with_a_growing_cache():
    total = rl.decode_work(DIMS, params=100, prefill_len=4, steps=2, precision="fp32", ops=7, tensors=3)
    steps = [rl.decoder_work(DIMS, 100, 1, past, "fp32", 7, 3) + rl.embed_work(4, 1, "fp32") for past in (4, 5)]
    assert total == steps[0] + steps[1]
    assert rl.embed_work(4, 1, "fp32") == rl.Work(0.0, 4 * (4 + 4), 1, 1, 2)


def _tiny_graph(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 5), np.float32), "w")
    bias = numpy_helper.from_array(np.ones(5, np.float32), "bias")
    cw = numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "cw")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "bias"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"]), helper.make_node("Reshape", ["y", "shape"], ["y2"]),
             helper.make_node("Conv", ["img", "cw"], ["z"])]  # fmt: skip
    shape = numpy_helper.from_array(np.array([15], np.int64), "shape")
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4]),
                     helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w, bias, cw, shape])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_graph_counting_by_hand(tmp_path):
    from vtprune.bench.costs import graph_cost

    _tiny_graph(tmp_path / "g.onnx")
    cost = graph_cost(tmp_path / "g.onnx")
    # MatMul (1,3,4)x(4,5): 2*15*4 = 120; Conv -> (1,2,6,6): 2*72*(3*3*3) = 3888
    assert cost.flops == 120 + 3888 and cost.unresolved == 0
    assert cost.weight_params == 20 + 5 + 54  # w, bias, conv weight (Reshape is a view op: its shape is free)
    # activations read+written by non-view ops: MatMul 12+15, Add 15+15, Relu 15+15, Conv 192+72
    assert cost.activation_elems == 27 + 30 + 30 + 264
    assert (cost.ops_all, cost.ops_gemm) == (4, 2)


def test_token_substitution_keeps_the_always_kept_tokens():
    from vtprune.bench.predict import substitute

    # LLaVA-NeXT tiny bundle at K=16 kept 22 of 70 (6 newline tokens always kept), prefill 33
    tokens = {"visual_total": 70, "visual_kept": 22, "prompt": 81, "prefill": 33}
    assert substitute(tokens, 16, Budget(8)) == tokens | {"visual_kept": 14, "prefill": 25}
    assert substitute(tokens, 16, Budget(None))["prefill"] == 81
    assert substitute(tokens, 16, Budget(0.25))["visual_kept"] == math.floor(0.25 * 64) + 6


def test_calibration_fits_a_geometric_mean_and_reports_leave_one_out_error():
    from vtprune.bench.predict import fit_time_scales

    predicted, measured = {"a": {"prefill": 1.0}, "b": {"prefill": 4.0}}, {"a": {"prefill": 2.0}, "b": {"prefill": 2.0}}
    fit = fit_time_scales(predicted, measured)
    assert fit["time_scale"]["prefill"] == pytest.approx(1.0)  # sqrt(2/1 * 2/4)
    # leave a out: scale 0.5 from b, 0.5*1 vs 2 -> -75%; leave b out: scale 2, 2*4 vs 2 -> +300%
    assert fit["loo_error_pct"]["prefill"] == pytest.approx({"a": -75.0, "b": 300.0})


def test_device_table_rows_are_complete():
    assert {"orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb", "thor", "cpu-host"} <= set(DEVICES)
    for device in filter(None, DEVICES.values()):
        assert {"fp32", "fp16", "int8"} <= set(device.peak_tflops) and device.sources and device.uncertain
        assert device.peak_tflops["fp32"] < device.peak_tflops["fp16"] <= device.peak_tflops["int8"]
    assert DEVICES["agx-orin-64gb"].mem_bandwidth_gbs == 204.8 and DEVICES["orin-nano-8gb"].mem_bandwidth_gbs == 68.0


FAKE_HOST = Device("cpu-host", "fake host", {"fp32": 0.1}, 10.0, 16, "fp32", efficiency={"compute": 1.0, "memory": 1.0},
                   op_overhead_us=1.0, run_overhead_us=5.0, io_overhead_us=1.0, op_count="all",
                   runtime="onnxruntime-cpu", sources=("test",), measured={"matmul": {"flops": 1e11}})  # fmt: skip


def test_predicted_report_of_real_bundles(bench_run, tmp_path, monkeypatch, capsys):
    import vtprune.bench.microbench as micro
    from tests.test_cli import run_main
    from vtprune.bench.schema import load_report

    monkeypatch.setattr(micro, "cpu_host_device", lambda threads=None: FAKE_HOST)
    bundles = [str(bench_run["work"] / name) for name in ("none-all", "gprune-k8")]
    out = tmp_path / "pred"
    assert run_main(["predict", *bundles, "--device", "cpu-host", "--calibrate", str(bench_run["report"]),
                     "--out", str(out)]) == 0  # fmt: skip
    report = load_report(out)
    measured = load_report(bench_run["report"])
    assert report["predicted"] is True and report["device"]["measured"] == {"matmul": {"flops": 1e11}}
    assert [b["label"] for b in report["budgets"]] == ["all", "8"]
    assert report["budgets"][1]["tokens"]["visual_kept"] == measured["budgets"][1]["tokens"]["visual_kept"]
    cal = report["calibration"]
    assert set(cal["time_scale"]) == {"vision_prune", "embed", "prefill", "decode_per_token"} and cal["same_machine"]
    roof = report["budgets"][0]["stages"]["prefill"]["roofline"]
    assert roof["bound"] in ("compute", "memory", "overhead") and roof["time_scale"] == cal["time_scale"]["prefill"]
    assert "PREDICTED" in (out / "report.md").read_text()
    capsys.readouterr()
    # the measured and the predicted report of the same bundles and workload compare without --force
    assert run_main(["compare", str(bench_run["report"]), str(out), "--out", str(tmp_path / "cmp")]) == 0
    assert "error" in capsys.readouterr().out


def test_jetson_prediction_at_substituted_budgets(bench_run, tmp_path):
    from vtprune.bench.config import parse_budgets
    from vtprune.bench.predict import run_predict

    cfg = PredictConfig(bundles=(bench_run["work"] / "gprune-k8",), device="agx-orin-64gb", precision="int8",
                        budgets=parse_budgets("all,16,8"), new_tokens=4, out=tmp_path / "p")  # fmt: skip
    report = run_predict(cfg)
    kept = [b["tokens"]["visual_kept"] for b in report["budgets"]]
    prefill = [b["stages"]["prefill"]["p50_ms"] for b in report["budgets"]]
    assert kept == [64, 16, 8] and prefill[0] > prefill[1] > prefill[2] > 0
    assert report["subject"]["precision"] == "int8" and report["device"]["peak_flops"] == 85e12
    assert report["budgets"][0]["stages"]["ttft"]["includes_preprocess"] is False and report["memory_check"]["fits"]
