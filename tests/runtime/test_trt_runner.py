"""The TensorRT runner's logic, driven through a stand-in for TensorRT's engine API backed by ONNX Runtime
(tests/runtime/fake_trt.py): generation equals ONNX Runtime's, the KV cache stays a device tensor between
steps, engines are checked before loading, and errors are one line. TensorRT itself needs a GPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.runtime import fake_trt
from vtprune.backends.trt.runner import EngineSession, TrtVlm, io_specs
from vtprune.config import PruneConfig
from vtprune.errors import BackendUnavailableError, BundleError, InputError
from vtprune.manifest import Sealed, read_manifest, write_manifest

pytest.importorskip("onnxruntime")


def fake_runner(bundle, device="cpu", **engine_kw) -> TrtVlm:
    return TrtVlm(bundle, device=device, trt=fake_trt.module,
                  load_engine=lambda graph: fake_trt.FakeEngine(bundle / f"{graph}.onnx", device=device,
                                                                **engine_kw))  # fmt: skip


@pytest.fixture(scope="module")
def alvts_bundle(tmp_path_factory, cache_dir):
    from vtprune.api import export_bundle
    from vtprune.export.bundle import ExportConfig

    out = tmp_path_factory.mktemp("trt-runner") / "alvts"
    export_bundle("tiny-llava", PruneConfig("alvts", 8, layer=1), ExportConfig(), out, cache_dir)
    return out


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-llava-next", "tiny-qwen2.5-vl"])
def test_generation_through_engine_sessions_equals_onnx_runtime(bundles, scene, name):
    from vtprune.backends.ort import OrtVlm

    ref = OrtVlm(bundles[name]).generate(scene, "what is in the image ?", max_new_tokens=6)
    runner = fake_runner(bundles[name])
    got = runner.generate(scene, "what is in the image ?", max_new_tokens=6)
    assert got.token_ids == ref.token_ids and got.visual_tokens_kept == ref.visual_tokens_kept
    assert runner.sessions["decoder"].engine.contexts[0].calls == len(got.token_ids)  # prefill + decode steps
    assert not runner.prefix_cache and got.cached_tokens == 0  # the engine's prefill takes the prompt whole


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the stand-in engine then reads and "
                    "writes device buffers)")  # fmt: skip
@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_engine_sessions_on_a_gpu_use_device_buffers_a_stream_and_cuda_events(bundles, scene, name):
    from vtprune.backends.ort import OrtVlm

    ref = OrtVlm(bundles[name]).generate(scene, "what is in the image ?", max_new_tokens=6)
    runner = fake_runner(bundles[name], device="cuda")
    got = runner.generate(scene, "what is in the image ?", max_new_tokens=6)
    assert got.token_ids == ref.token_ids
    assert runner.sessions["decoder"].stream is not None
    assert set(runner.gpu_ms()) == {"vision", "embed", "decoder"} and all(v > 0 for v in runner.gpu_ms().values())


def test_routed_bundle_runs_its_prefill_and_decode_engines(alvts_bundle, scene):
    from vtprune.backends.ort import OrtVlm

    ref = OrtVlm(alvts_bundle).generate(scene, "what is in the image ?", max_new_tokens=5)
    runner = fake_runner(alvts_bundle)
    assert set(runner.sessions) == {"vision", "embed", "prefill", "decode"}
    got = runner.generate(scene, "what is in the image ?", max_new_tokens=5)
    assert got.token_ids == ref.token_ids and got.layer_visual_tokens == ref.layer_visual_tokens


def test_kv_cache_stays_a_device_tensor_and_is_bound_without_a_copy(bundles, scene, monkeypatch):
    runner = fake_runner(bundles["tiny-llava"])
    session = runner.sessions["decoder"]
    seen = []
    run = EngineSession.run

    def spy(self, names, feeds):
        outs = run(self, names, feeds)
        if self is session:
            out_names = [s.name for s in self.specs if not s.is_input]
            seen.append(({type(v) for k, v in feeds.items() if k.startswith("past_key_values")},
                         {type(o) for o, n in zip(outs, out_names, strict=True) if n.startswith("present")},
                         {type(o) for o, n in zip(outs, out_names, strict=True) if n == "logits"}))  # fmt: skip
        return outs

    monkeypatch.setattr(EngineSession, "run", spy)
    runner.generate(scene, "what is in the image ?", max_new_tokens=4)
    assert len(seen) == 4 and seen[0][0] == {np.ndarray}  # the empty cache of the prefill comes from the host
    assert all(past == {torch.Tensor} for past, _, _ in seen[1:])  # then the engine's own outputs, as they are
    assert all(present == {torch.Tensor} and logits == {np.ndarray} for _, present, logits in seen)


def test_a_prompt_beyond_the_profile_is_an_input_error(bundles, scene):
    runner = fake_runner(bundles["tiny-llava"], profile_max={"inputs_embeds": 1})
    with pytest.raises(InputError, match="outside the engine's profile; rebuild with a larger --max-seq"):
        runner.generate(scene, "what is in the image ?", max_new_tokens=2)


def test_an_engine_tensor_type_the_runner_cannot_bind_is_refused(bundles):
    engine = fake_trt.FakeEngine(bundles["tiny-llava"] / "embed.onnx")
    engine.get_tensor_dtype = lambda name: fake_trt.DataType.DOUBLE
    with pytest.raises(BundleError, match="has type DOUBLE"):
        io_specs(engine, fake_trt.module)


def test_engines_are_checked_before_they_load(bundles, tmp_path, monkeypatch):
    bundle = tmp_path / "b"
    shutil.copytree(bundles["tiny-llava"], bundle)
    runner = TrtVlm.__new__(TrtVlm)
    runner.bundle, runner.device = bundle, torch.device("cuda")

    def reseal() -> None:  # engines are bundle files: listed in the manifest, read through its seal
        write_manifest(bundle, read_manifest(bundle, verify=False))
        runner.sealed = Sealed(bundle)

    reseal()
    fake_module = type("T", (), {"__version__": "10.3.0", "Logger": type("L", (), {"WARNING": 0, "__init__":
                                 lambda self, s: None}), "Runtime": lambda logger: None})  # fmt: skip
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 7))
    load = runner._engine_loader(fake_module, "tensorrt")
    with pytest.raises(BundleError, match="has no vision.engine; build the engines: vtprune build"):
        load("vision")
    (bundle / "vision.engine").write_bytes(b"x")
    meta = {"flavour": "tensorrt", "trt_version": "10.7.0", "target": None}
    (bundle / "vision.engine.json").write_text(json.dumps(meta))
    reseal()
    with pytest.raises(BundleError, match="built with tensorrt 10.7.0 cannot load in tensorrt 10.3.0"):
        load("vision")
    (bundle / "vision.engine.json").write_text(json.dumps(meta | {"trt_version": "10.3.0", "target": "sm89"}))
    reseal()
    with pytest.raises(BundleError, match="built for sm89 cannot run on this sm87 GPU"):
        load("vision")
    (bundle / "vision.engine.json").write_text(json.dumps(meta | {"trt_version": "10.3.0", "target": "sm87"}))
    reseal()
    (bundle / "vision.engine").write_bytes(b"y")  # swapped after sealing: refused when read
    with pytest.raises(BundleError, match="vision.engine does not match its sha256"):
        load("vision")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_run_with_the_trt_backend_without_a_gpu_is_one_line(bundles, png, capsys):
    from vtprune.cli import main

    assert main(["run", str(bundles["tiny-llava"]), "--backend", "trt", "--image", str(png), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]
    with pytest.raises(BackendUnavailableError):
        TrtVlm(bundles["tiny-llava"])


def test_bench_with_the_trt_backend_takes_built_bundles_only(bundles):
    from vtprune.bench.config import BenchConfig
    from vtprune.errors import ConfigError

    BenchConfig(bundles=(bundles["tiny-llava"],), backend="trt")
    for kw in ({"model": "tiny-llava"}, {"bundles": (bundles["tiny-llava"],), "provider": "cuda"},
               {"bundles": (bundles["tiny-llava"],), "threads": 2}):  # fmt: skip
        with pytest.raises(ConfigError, match="--backend trt runs built bundles"):
            BenchConfig(backend="trt", **kw)


def test_bench_target_reports_the_engines(bundles, scene, monkeypatch):
    from vtprune.bench.targets import TrtTarget
    from vtprune.bench.workload import Sample

    monkeypatch.setattr("vtprune.backends.trt.runner.TrtVlm",
                        lambda bundle: fake_runner(bundle))  # fmt: skip
    target = TrtTarget(bundles["tiny-llava"])
    times, info = target.run(Sample(scene, "what is in the image ?", "scene"), 3)
    assert {"prefill", "decode", "vision"} <= set(times) and info.decode_steps == 2
    assert target.subject()["backend"] == "trt"


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_check_compares_the_engines_with_pytorch(bundles, tiny_dirs, scene, name):
    from vtprune.check.validate import compare_backends
    from vtprune.manifest import read_manifest
    from vtprune.models import load_vlm
    from vtprune.prune.ties import FP16_MARGIN

    adapter = load_vlm(str(tiny_dirs[name]))
    cfg = PruneConfig.from_dict(read_manifest(bundles[name])["prune"])  # the budget as exported (a count)
    rows = compare_backends(adapter, cfg, bundles[name], scene, "what is in the image ?", 8,
                            fake_runner(bundles[name]))  # fmt: skip
    assert all(r["ok"] for r in rows), rows
    assert {"kept visual indices", "prefill logits", "greedy tokens (8 steps)"} <= {r["check"] for r in rows}
    kept = next(r for r in rows if r["check"] == "kept visual indices")
    assert kept["margin_limit"] == FP16_MARGIN  # judged like fp16: ties may swap
    assert kept["iou"] == 1.0 or kept["max_margin"] <= FP16_MARGIN


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_check_with_the_trt_backend_without_a_gpu_is_one_line(bundles, capsys):
    from vtprune.cli import main

    assert main(["check", str(bundles["tiny-llava"]), "--backend", "trt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]


# --- engine vs ONNX Runtime, graph by graph (Polygraphy's Comparator) ---------------------------
def _perturb(session, output: str, change) -> None:
    """Make ``session`` (an EngineSession) return ``change(array)`` for ``output``."""
    run, names = session.run, [o.name for o in session.get_outputs()]

    def patched(output_names, feeds):
        outs = run(output_names, feeds)
        i = names.index(output)
        outs[i] = change(outs[i].copy() if isinstance(outs[i], np.ndarray) else outs[i].clone())
        return outs

    session.run = patched


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_every_engine_is_compared_with_onnx_runtime_through_polygraphy(bundles, scene, name):
    from vtprune.check.parity import engine_parity

    rows = engine_parity(bundles[name], fake_runner(bundles[name]), scene, "what is in the image ?", steps=2)
    by_graph = {r["check"].split()[0]: r for r in rows}
    assert set(by_graph) == {"vision", "embed", "decoder"} and all(r["ok"] for r in rows), rows
    assert by_graph["vision"]["kept_iou"] == 1.0 and by_graph["vision"]["calls"] == 1
    assert by_graph["decoder"]["calls"] == 2  # the prefill and one decode step, with ORT's KV cache
    assert by_graph["decoder"]["min_cosine"] > 0.9999 and by_graph["decoder"]["max_abs_diff"] < 1e-5


def test_a_drifting_engine_fails_its_row(bundles, scene):
    from vtprune.check.parity import engine_parity

    runner = fake_runner(bundles["tiny-llava"])
    rng = np.random.default_rng(0)
    _perturb(runner.sessions["decoder"], "logits", lambda a: a + rng.normal(0, 3 * a.std(), a.shape).astype(a.dtype))
    rows = {r["check"].split()[0]: r for r in engine_parity(bundles["tiny-llava"], runner, scene, "hi", steps=1)}
    assert not rows["decoder"]["ok"] and rows["decoder"]["worst_output"] == "logits"
    assert rows["decoder"]["min_cosine"] < 0.99
    assert rows["vision"]["ok"] and rows["embed"]["ok"]


def test_swapped_kept_tokens_are_reported_and_left_to_the_tie_rule(bundles, scene):
    from vtprune.check.parity import engine_parity

    runner = fake_runner(bundles["tiny-llava"])

    def swap_first(idx):
        free = np.setdiff1d(np.arange(idx.max() + 2), idx)
        idx[..., 0] = free[0]
        return np.sort(idx, axis=-1)

    _perturb(runner.sessions["vision"], "kept_indices", swap_first)
    rows = {r["check"].split()[0]: r for r in engine_parity(bundles["tiny-llava"], runner, scene, "hi", steps=1)}
    assert rows["vision"]["ok"] and rows["vision"]["unjudged_calls"] == 1
    assert 0 < rows["vision"]["kept_iou"] < 1 and "min_cosine" not in rows["vision"]


def test_check_with_the_trt_backend_adds_the_engine_rows(bundles, cache_dir, monkeypatch, capsys):
    import vtprune.backends.trt.runner as trt_runner
    from vtprune.cli import main

    monkeypatch.setattr(trt_runner, "TrtVlm", lambda bundle, verify: fake_runner(bundle))
    args = ["check", str(bundles["tiny-llava"]), "--backend", "trt", "--steps", "4", "--cache-dir", str(cache_dir)]
    code = main(args)
    out = capsys.readouterr().out
    assert code == 0, out
    for graph in ("vision", "embed", "decoder"):
        assert f"ok  {graph} engine vs ONNX Runtime (Polygraphy): calls" in out


def test_routed_bundles_compare_their_prefill_and_decode_engines(alvts_bundle, scene):
    from vtprune.check.parity import engine_parity

    rows = engine_parity(alvts_bundle, fake_runner(alvts_bundle), scene, "what is in the image ?", steps=2)
    by_graph = {r["check"].split()[0]: r for r in rows}
    assert set(by_graph) == {"vision", "embed", "prefill", "decode"} and all(r["ok"] for r in rows), rows
    assert by_graph["prefill"]["kept_iou"] == 1.0  # the per-layer selected rows, compared as index sets


def test_an_engine_output_of_another_shape_fails_its_row(bundles, scene):
    from vtprune.check.parity import engine_parity

    runner = fake_runner(bundles["tiny-llava"])
    _perturb(runner.sessions["embed"], "inputs_embeds", lambda a: a[..., :-1])
    rows = {r["check"].split()[0]: r for r in engine_parity(bundles["tiny-llava"], runner, scene, "hi", steps=1)}
    assert not rows["embed"]["ok"] and rows["embed"]["max_abs_diff"] == float("inf")
    assert rows["embed"]["shape_mismatch"] == ["inputs_embeds"]
