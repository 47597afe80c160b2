"""TensorRT engine builds from small ONNX graphs (CPU: TensorRT-RTX compiles ahead of time for sm89).

The import tests always run. The build tests need a TensorRT builder (``pip install 'vtprune[trt]'``) and are
skipped, with the import error as the reason, when neither ``tensorrt`` nor ``tensorrt_rtx`` imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from vtprune.backends.trt import EngineBuildError, OnnxParseError, build_engine, import_tensorrt, resolve_target
from vtprune.errors import BackendUnavailableError, ConfigError

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

try:
    TRT, FLAVOUR = import_tensorrt()
    NO_TRT = ""
except BackendUnavailableError as exc:
    TRT, FLAVOUR, NO_TRT = None, "", f"no TensorRT builder: {exc}"


def needs_trt(test):
    """Mark a test ``trt`` and skip it, with the import error as the reason, when no builder imports."""
    return pytest.mark.trt(pytest.mark.skipif(bool(NO_TRT), reason=NO_TRT)(test))


def needs_rtx(test):
    """Like ``needs_trt``, for behaviour specific to TensorRT-RTX."""
    return needs_trt(pytest.mark.skipif(FLAVOUR != "tensorrt-rtx", reason="TensorRT-RTX behaviour")(test))


TARGET = "sm89" if FLAVOUR == "tensorrt-rtx" else None  # full TensorRT builds for the GPU present
N, D, K, OPSET = 64, 32, 16, 18
PROFILE = {"x": ((1, N, D), (2, N, D), (4, N, D))}


def _const(name: str, value) -> onnx.TensorProto:
    return nh.from_array(np.asarray(value), name)


def _save(tmp_path: Path, name: str, nodes, inputs, outputs, inits=(), functions=(), domains=()) -> Path:
    graph = oh.make_graph(nodes, name, inputs, outputs, list(inits))
    opsets = [oh.make_opsetid("", OPSET)] + [oh.make_opsetid(d, 1) for d in domains]
    model = oh.make_model(graph, opset_imports=opsets, functions=list(functions))
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def _x_input() -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info("x", TP.FLOAT, ["batch", N, D])


def _route_nodes(scores: str) -> list[onnx.NodeProto]:
    """TopK(constant K) -> ascending indices -> GatherElements: (B, N, D) -> (B, K, D)."""
    return [
        oh.make_node("TopK", [scores, "k"], ["top_v", "top_i"], axis=-1),
        oh.make_node("Cast", ["top_i"], ["top_f"], to=TP.FLOAT),
        oh.make_node("TopK", ["top_f", "k"], ["asc_f", "order"], axis=-1, largest=0),
        oh.make_node("Cast", ["asc_f"], ["indices"], to=TP.INT64),  # (B, K) ascending
        oh.make_node("Unsqueeze", ["indices", "last"], ["idx3"]),
        oh.make_node("Expand", ["idx3", "expand_to"], ["idx_e"]),  # (B, K, D)
        oh.make_node("GatherElements", ["x", "idx_e"], ["tokens"], axis=1),
    ]


def _route_consts() -> list[onnx.TensorProto]:
    return [_const("k", np.array([K], np.int64)), _const("last", np.array([-1], np.int64)),
            _const("expand_to", np.array([1, 1, D], np.int64))]  # fmt: skip


def _route_outputs() -> list[onnx.ValueInfoProto]:
    return [oh.make_tensor_value_info("tokens", TP.FLOAT, ["batch", K, D]),
            oh.make_tensor_value_info("indices", TP.INT64, ["batch", K])]  # fmt: skip


@pytest.fixture
def standard_onnx(tmp_path: Path) -> Path:
    """(a) MatMul, Where, Softmax, TopK (constant K), GatherElements, Gather; dynamic batch."""
    nodes = [
        oh.make_node("MatMul", ["x", "w"], ["xw"]),  # (B, N, D)
        oh.make_node("ReduceSum", ["xw", "last"], ["s"], keepdims=0),  # (B, N)
        oh.make_node("Greater", ["s", "zero"], ["pos"]),
        oh.make_node("Where", ["pos", "s", "zero"], ["s_pos"]),
        oh.make_node("Softmax", ["s_pos"], ["scores"], axis=-1),
        *_route_nodes("scores"),
        oh.make_node("Gather", ["w", "rows"], ["w_rows"], axis=0),  # (2, D)
    ]
    rng = np.random.default_rng(0)
    inits = [*_route_consts(), _const("w", rng.standard_normal((D, D), dtype=np.float32)),
             _const("zero", np.float32(0)), _const("rows", np.array([0, 3], np.int64))]  # fmt: skip
    outputs = [*_route_outputs(), oh.make_tensor_value_info("w_rows", TP.FLOAT, [2, D])]
    return _save(tmp_path, "standard", nodes, [_x_input()], outputs, inits)


def _function_onnx(tmp_path: Path, op_type: str, with_body: bool) -> Path:
    """(b)/(d) A vtprune-domain node computing scores (B, N), with or without a model-local function body."""
    body = [
        oh.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        oh.make_node("MatMul", ["x", "xt"], ["sim"]),  # (B, N, N)
        oh.make_node("Relu", ["sim"], ["sim_pos"]),
        oh.make_node("Constant", [], ["axes"], value=_const("axes", np.array([-1], np.int64))),
        oh.make_node("ReduceSum", ["sim_pos", "axes"], ["degree"], keepdims=0),  # (B, N)
        oh.make_node("Softmax", ["degree"], ["scores"], axis=-1),
    ]
    fn = oh.make_function("vtprune", op_type, ["x"], ["scores"], body, [oh.make_opsetid("", OPSET)])
    nodes = [oh.make_node(op_type, ["x"], ["scores"], domain="vtprune", name="prune0"), *_route_nodes("scores")]
    functions = [fn] if with_body else []
    return _save(tmp_path, op_type, nodes, [_x_input()], _route_outputs(), _route_consts(), functions, ["vtprune"])


def _pruner(k: int):
    """A torch module scoring tokens, keeping the top k in ascending order, and gathering them."""
    import torch

    class Pruner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(D, D)

        def forward(self, x):  # (B, N, D) -> (B, k, D), (B, k)
            idx = self.proj(x).norm(dim=-1).topk(k, dim=-1).indices.sort(dim=-1).values
            return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])), idx

    return Pruner().eval()


# --- import --------------------------------------------------------------------------------------------------
def test_importing_vtprune_loads_no_tensorrt():
    code = (
        "import sys, vtprune, vtprune.runtime, vtprune.backends.trt\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'tensorrt_rtx', 'onnx', 'torch')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_import_tensorrt_names_the_extra_when_nothing_imports(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # None in sys.modules makes `import` raise ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'vtprune\[trt\]'"):
        import_tensorrt()


def test_import_tensorrt_prefers_full_tensorrt(monkeypatch: pytest.MonkeyPatch):
    fake = types.ModuleType("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert import_tensorrt() == (fake, "tensorrt")


@needs_rtx
def test_import_tensorrt_falls_back_to_rtx(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    module, flavour = import_tensorrt()
    assert flavour == "tensorrt-rtx" and module.__name__ == "tensorrt_rtx"


# --- targets -------------------------------------------------------------------------------------------------
@needs_rtx
def test_resolve_target_maps_names_to_compute_capabilities():
    cc = TRT.ComputeCapability
    assert resolve_target(TRT, FLAVOUR, "sm_86, SM120") == [cc.SM86, cc.SM120]
    assert resolve_target(TRT, FLAVOUR, "native") == [cc.CURRENT]
    assert resolve_target(TRT, FLAVOUR, None) == []


@needs_rtx
@pytest.mark.parametrize(("target", "reason"), [("sm87", "Jetson Orin"), ("sm90", "Hopper"), ("sm61", "sm75")])
def test_unsupported_target_says_why(target: str, reason: str):
    with pytest.raises(ConfigError, match=reason):
        resolve_target(TRT, FLAVOUR, target)


def test_full_tensorrt_rejects_cross_compilation():
    with pytest.raises(ConfigError, match="GPU it runs on"):
        resolve_target(types.ModuleType("tensorrt"), "tensorrt", "sm89")


# --- builds --------------------------------------------------------------------------------------------------
@needs_trt
def test_standard_ops_build(standard_onnx: Path, tmp_path: Path):
    result = build_engine(standard_onnx, PROFILE, target=TARGET)
    assert (result.flavour, result.target, result.precision) == (FLAVOUR, TARGET, "fp32")
    assert result.engine_size == len(result.engine) > 0 and result.num_layers > 0
    assert result.profiles == {"x": ((1, N, D), (2, N, D), (4, N, D))}
    plan = result.write(tmp_path / "standard.plan")
    sidecar = json.loads(plan.with_name("standard.plan.json").read_text())
    assert plan.stat().st_size == result.engine_size and "engine" not in sidecar and sidecar["flavour"] == FLAVOUR


@needs_trt
def test_dynamic_input_without_profile_is_named(standard_onnx: Path):
    with pytest.raises(ConfigError, match=r"need an optimization profile: x \(-1, 64, 32\)"):
        build_engine(standard_onnx, target=TARGET)


@needs_trt
@pytest.mark.parametrize(
    ("profiles", "match"),
    [
        ({"y": ((1,), (1,), (1,))}, "unknown inputs"),
        ({"x": ((1, N, D), (2, N, D), (1, N, D))}, "min <= opt <= max"),
        ({"x": ((1, N, D), (2, N, D + 1), (4, N, D))}, "does not fit"),
        ({"x": ((1, N, D), (4, N, D))}, r"\(min, opt, max\)"),
    ],
)
def test_bad_profiles_are_config_errors(standard_onnx: Path, profiles, match: str):
    with pytest.raises(ConfigError, match=match):
        build_engine(standard_onnx, profiles, target=TARGET)


@needs_rtx
def test_rtx_refuses_fp16_builder_flag(standard_onnx: Path):
    with pytest.raises(ConfigError, match="strongly typed"):
        build_engine(standard_onnx, PROFILE, precision="fp16", target=TARGET)


@needs_rtx
def test_rtx_typed_build_for_two_targets(standard_onnx: Path):
    result = build_engine(standard_onnx, PROFILE, precision="typed", target="sm86,sm120")
    assert result.target == "sm86,sm120" and result.engine_size > 0


@needs_trt
def test_custom_domain_node_with_local_function_builds(tmp_path: Path):
    result = build_engine(_function_onnx(tmp_path, "ToyPropagate", with_body=True), PROFILE, target=TARGET)
    assert result.engine_size > 0


@needs_trt
@pytest.mark.parametrize("blocks", [1, 3], ids=["one-gram", "symmetric-blocks"])
def test_vtprune_ops_with_their_function_bodies_build(tmp_path: Path, blocks: int):
    """The real GraphPropagate/TopKRoute bodies of vtprune.export.ops (T unrolled, constant K), with the
    cosine Gram as one MatMul and by symmetric row blocks (Split with num_outputs)."""
    from vtprune.export.ops import onnx_defs

    nodes = [
        oh.make_node("GraphPropagate", ["x", "valid"], ["scores"], domain="vtprune", theta=0.5, tau=0.1, iters=3),
        oh.make_node("TopKRoute", ["x", "scores"], ["tokens", "indices"], domain="vtprune", k=K),
    ]
    valid = oh.make_tensor_value_info("valid", TP.BOOL, ["batch", N])
    graph = oh.make_graph(nodes, "vtprune_ops", [_x_input(), valid], _route_outputs())
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", OPSET)])
    onnx.save(onnx_defs.attach_functions(model, blocks=blocks), tmp_path / "ops.onnx")
    profiles = {**PROFILE, "valid": ((1, N), (2, N), (4, N))}
    assert build_engine(tmp_path / "ops.onnx", profiles, target=TARGET).engine_size > 0


@needs_trt
def test_fp16_tokens_around_fp32_pruning_ops_build_strongly_typed(tmp_path: Path):
    """An fp16 vision graph's pruning stage: fp16 tokens cast up for the vtprune ops, kept tokens cast back."""
    from vtprune.export.ops import onnx_defs

    nodes = [
        oh.make_node("Cast", ["x"], ["xf"], to=TP.FLOAT),
        oh.make_node("GraphPropagate", ["xf", "valid"], ["scores"], domain="vtprune", theta=0.5, tau=0.1, iters=3),
        oh.make_node("TopKRoute", ["xf", "scores"], ["kept", "indices"], domain="vtprune", k=K),
        oh.make_node("Cast", ["kept"], ["tokens"], to=TP.FLOAT16),
    ]
    inputs = [oh.make_tensor_value_info("x", TP.FLOAT16, ["batch", N, D]),
              oh.make_tensor_value_info("valid", TP.BOOL, ["batch", N])]  # fmt: skip
    outputs = [oh.make_tensor_value_info("tokens", TP.FLOAT16, ["batch", K, D]),
               oh.make_tensor_value_info("indices", TP.INT64, ["batch", K])]  # fmt: skip
    model = oh.make_model(oh.make_graph(nodes, "fp16_ops", inputs, outputs), opset_imports=[oh.make_opsetid("", OPSET)])
    onnx.save(onnx_defs.attach_functions(model), tmp_path / "fp16_ops.onnx")
    profiles = {**PROFILE, "valid": ((1, N), (2, N), (4, N))}
    result = build_engine(tmp_path / "fp16_ops.onnx", profiles, precision="typed", target=TARGET)
    assert result.engine_size > 0 and result.precision == "typed"


@needs_trt
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_torch_export_of_topk_sort_gather_builds(tmp_path: Path, dynamo: bool):
    torch = pytest.importorskip("torch")
    path = tmp_path / "pruner.onnx"
    x = torch.randn(2, N, D)
    if dynamo:
        shapes = {"x": {0: torch.export.Dim("batch")}}
        torch.onnx.export(_pruner(K), (x,), path, dynamo=True, opset_version=OPSET, dynamic_shapes=shapes)
    else:
        axes = {"x": {0: "batch"}}
        torch.onnx.export(_pruner(K), (x,), path, dynamo=False, opset_version=OPSET,
                          input_names=["x"], dynamic_axes=axes)  # fmt: skip
    assert build_engine(path, PROFILE, target=TARGET).engine_size > 0


@needs_trt
def test_unknown_op_raises_typed_error_naming_the_node(tmp_path: Path):
    with pytest.raises(OnnxParseError) as info:
        build_engine(_function_onnx(tmp_path, "Frobnicate", with_body=False), PROFILE, target=TARGET)
    first, *rest = str(info.value).splitlines()
    assert "Frobnicate" in first and "function body" in first
    assert [(i.node_name, i.op_type) for i in info.value.issues] == [("prune0", "Frobnicate")]
    assert any("'prune0' (Frobnicate)" in line for line in rest)


@needs_rtx
def test_loop_with_empty_cond_in_a_function_is_rejected_with_a_hint(tmp_path: Path):
    """onnxscript's `for i in range(n)` emits Loop(n, "", s); TensorRT-RTX 1.7's parser rejects the body."""
    loop_body = oh.make_graph(
        [oh.make_node("Mul", ["s_in", "s_in"], ["s_out"]), oh.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [oh.make_tensor_value_info("i", TP.INT64, []), oh.make_tensor_value_info("cond_in", TP.BOOL, []),
         oh.make_tensor_value_info("s_in", TP.FLOAT, None)],
        [oh.make_tensor_value_info("cond_out", TP.BOOL, []), oh.make_tensor_value_info("s_out", TP.FLOAT, None)],
    )  # fmt: skip
    body = [oh.make_node("Constant", [], ["n"], value=_const("n", np.int64(3))),
            oh.make_node("Loop", ["n", "", "x"], ["y"], body=loop_body)]  # fmt: skip
    fn = oh.make_function("vtprune", "Repeat", ["x"], ["y"], body, [oh.make_opsetid("", OPSET)])
    node = oh.make_node("Repeat", ["x"], ["y"], domain="vtprune", name="rep0")
    y = oh.make_tensor_value_info("y", TP.FLOAT, ["batch", N, D])
    path = _save(tmp_path, "loop", [node], [_x_input()], [y], functions=[fn], domains=["vtprune"])
    with pytest.raises(OnnxParseError, match="constant true cond") as info:
        build_engine(path, PROFILE, target=TARGET)
    assert info.value.issues[0].function_stack  # the failing node is inside the function


@needs_rtx
def test_topk_above_limit_fails_with_a_hint(tmp_path: Path):
    scores = oh.make_tensor_value_info("s", TP.FLOAT, [1, 4096])
    idx = oh.make_tensor_value_info("i", TP.INT64, [1, 3841])
    node = oh.make_node("TopK", ["s", "k"], ["v", "i"], axis=-1)
    path = _save(tmp_path, "topk", [node], [scores], [idx], [_const("k", np.array([3841], np.int64))])
    with pytest.raises(EngineBuildError, match="3840"):
        build_engine(path, target=TARGET)


# --- timing cache, progress, cancel --------------------------------------------------------------------------
@needs_trt
def test_timing_cache_is_written_and_reused(standard_onnx: Path, tmp_path: Path):
    cache = tmp_path / "caches" / "trt.cache"
    first = build_engine(standard_onnx, PROFILE, target=TARGET, timing_cache=cache)
    assert cache.stat().st_size > 0 and first.timing_cache["sha256_before"] is None
    assert first.timing_cache["path"] == str(cache) and first.timing_cache["used_by_builder"] == (FLAVOUR == "tensorrt")
    second = build_engine(standard_onnx, PROFILE, target=TARGET, timing_cache=cache)
    assert second.engine_size > 0 and second.timing_cache["sha256_before"] == first.timing_cache["sha256_after"]
    assert not list(cache.parent.glob(".trt.cache.*"))  # the atomic write's temp file is gone


@needs_trt
def test_unreadable_timing_cache_is_a_config_error(standard_onnx: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"cannot be read .*delete it"):
        build_engine(standard_onnx, PROFILE, target=TARGET, timing_cache=tmp_path)  # a directory


@needs_trt
def test_progress_reports_phases_and_ctrl_c_cancels_the_build(standard_onnx: Path):
    if not hasattr(TRT, "IProgressMonitor"):
        pytest.skip(f"{FLAVOUR} {TRT.__version__} has no IProgressMonitor")
    lines: list[str] = []
    build_engine(standard_onnx, PROFILE, target=TARGET, progress=lines.append)
    assert lines[0].startswith("Building engine (") and lines[-1].startswith("Building engine: done in ")

    def interrupt(line: str) -> None:
        lines.append(line)
        if "Preparing graph" in line:
            raise KeyboardInterrupt

    lines.clear()
    with pytest.raises(KeyboardInterrupt):
        build_engine(standard_onnx, PROFILE, target=TARGET, progress=interrupt)
    assert lines[-1].strip().startswith("Preparing graph")  # TensorRT stopped: no later phase started


@needs_trt
def test_bundle_build_with_timing_cache_through_the_cli(bundles, tmp_path: Path, capsys):
    import shutil

    from vtprune.cli import main

    copy, cache = tmp_path / "b", tmp_path / "trt.cache"
    shutil.copytree(bundles["tiny-llava"], copy)
    args = ["build", str(copy), "--graphs", "embed", "--max-seq", "64", "--timing-cache", str(cache)]
    args += ["--target", TARGET] if TARGET else []
    assert main(args) == 0 and cache.stat().st_size > 0
    err = capsys.readouterr().err
    assert "vtprune build:       Building engine (" in err  # the progress monitor's lines
    assert main([*args, "--force"]) == 0
    meta = json.loads((copy / "embed.engine.json").read_text())
    assert meta["timing_cache"]["path"] == str(cache) and meta["timing_cache"]["sha256_before"]
    assert meta["build"]["timing_cache"] == str(cache)

    engine = (copy / "embed.engine").read_bytes()
    cache.write_bytes(b"not a timing cache")
    assert main([*args, "--force"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not list(copy.glob(".engines-*"))
    assert (copy / "embed.engine").read_bytes() == engine  # no new engine was written over the old one
    (line,) = [line for line in err.splitlines() if line.startswith("vtprune: error:")]
    assert "ConfigError" not in line and str(cache) in line and "delete it" in line


def test_a_build_that_would_not_fit_is_refused_with_the_need(bundles, tmp_path: Path, monkeypatch, capsys):
    import shutil

    from vtprune.cli import main
    from vtprune.export import memory

    copy = tmp_path / "b"
    shutil.copytree(bundles["tiny-llava"], copy)
    monkeypatch.setattr(memory, "available_memory", lambda: 1 << 20)  # 1 MB: nothing fits
    assert main(["build", str(copy), "--graphs", "decoder", "--target", "sm89"]) == 2
    err = capsys.readouterr().err
    assert "building decoder.engine from" in err and "GB of host memory" in err and "Traceback" not in err
    assert not list(copy.glob("*.engine"))
