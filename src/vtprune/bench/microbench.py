"""Peaks of this machine, measured with the runtime the bundles run on (ONNX Runtime, CPU provider):
matmul FLOP/s, memory bandwidth, and the fixed cost of an op and of a graph run. This is the
``cpu-host`` row of the device table; the measurements are stored in the predicted report.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vtprune.bench.devices import Device
from vtprune.runtime.report import measure

MATMUL_SIZES = (512, 1024, 2048)
BANDWIDTH_ELEMS = 1 << 25  # 128 MiB of fp32: far beyond any last-level cache
CHAIN = 200


def _session(graph: Any, threads: int | None) -> Any:
    import onnx

    from vtprune.backends.ort import make_session

    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=9)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "micro.onnx"
        onnx.save(model, str(path))
        return make_session(path, "cpu", threads)


def _tensor(name: str, shape: list[int]) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def matmul_flops(threads: int | None, sizes: tuple[int, ...] = MATMUL_SIZES) -> dict[str, Any]:
    """Best FLOP/s of an n x n x n fp32 MatMul over ``sizes`` (fastest of 10 runs each: a peak)."""
    from onnx import helper, numpy_helper

    best: dict[str, Any] = {"flops": 0.0}
    rng = np.random.default_rng(0)
    for n in sizes:
        weight = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [_tensor("x", [n, n])],
                                  [_tensor("y", [n, n])], [weight])  # fmt: skip
        sess, x = _session(graph, threads), {"x": rng.standard_normal((n, n), dtype=np.float32)}
        t = measure(lambda s=sess, x=x: s.run(None, x), warmup=2, iters=10)
        flops = 2.0 * n**3 / (t.min_ms / 1e3)
        if flops > best["flops"]:
            best = {"flops": flops, "n": n, "min_ms": t.min_ms, "p50_ms": t.p50_ms}
    return best


def memory_bandwidth(threads: int | None, elems: int = BANDWIDTH_ELEMS) -> dict[str, Any]:
    """B/s of an fp32 ``y = x + x`` over ``elems`` elements (reads 4*elems bytes, writes 4*elems; fastest
    of 10 runs)."""
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "bw", [_tensor("x", [elems])],
                              [_tensor("y", [elems])])  # fmt: skip
    sess, x = _session(graph, threads), {"x": np.ones(elems, np.float32)}
    t = measure(lambda: sess.run(None, x), warmup=2, iters=10)
    moved = 2 * 4 * elems
    return {"bandwidth": moved / (t.min_ms / 1e3), "bytes": moved, "min_ms": t.min_ms, "p50_ms": t.p50_ms}


def _chain_graph(n: int, width: int = 64) -> Any:
    """``n`` ops alternating a (1, width) x (width, width) MatMul and an Add: decode-step-sized ops."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    names, nodes, inits = ["x"] + [f"t{i}" for i in range(n - 1)] + ["y"], [], []
    for i in range(n):
        if i % 2 == 0:
            inits.append(numpy_helper.from_array(rng.standard_normal((width, width), dtype=np.float32) * 0.05, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]]))
        else:
            nodes.append(helper.make_node("Add", [names[i], names[i]], [names[i + 1]]))
    return helper.make_graph(nodes, "chain", [_tensor("x", [1, width])], [_tensor("y", [1, width])], inits)


def _io_graph(pairs: int) -> Any:
    from onnx import helper

    nodes = [helper.make_node("Identity", [f"x{i}"], [f"y{i}"]) for i in range(pairs)]
    return helper.make_graph(nodes, "io", [_tensor(f"x{i}", [1, 16]) for i in range(pairs)],
                             [_tensor(f"y{i}", [1, 16]) for i in range(pairs)])  # fmt: skip


def op_overheads(threads: int | None, chain: int = CHAIN, pairs: int = 16) -> dict[str, Any]:
    """Fixed costs (seconds): per op (slope of a MatMul/Add chain of ``chain`` ops), per bound input or
    output tensor (slope of an Identity graph with ``pairs`` in/out pairs), and per graph run (the rest)."""

    def p50(graph: Any, feeds: dict[str, np.ndarray]) -> float:
        sess = _session(graph, threads)
        return measure(lambda: sess.run(None, feeds), warmup=20, iters=200).p50_ms / 1e3

    x = {"x": np.ones((1, 64), np.float32)}
    t_one, t_chain = p50(_chain_graph(1), x), p50(_chain_graph(chain + 1), x)
    io = {f"x{i}": np.ones((1, 16), np.float32) for i in range(pairs + 1)}
    t_io1, t_ion = p50(_io_graph(1), {"x0": io["x0"]}), p50(_io_graph(pairs + 1), io)
    per_op = max(0.0, (t_chain - t_one) / chain)
    per_io = max(0.0, (t_ion - t_io1) / (2 * pairs))
    return {"op_s": per_op, "io_s": per_io, "run_s": max(0.0, t_io1 - 2 * per_io - per_op), "chain": chain,
            "pairs": pairs, "p50_s": {"chain_1": t_one, "chain_n": t_chain, "io_1": t_io1, "io_n": t_ion}}  # fmt: skip


def cpu_host_device(threads: int | None = None) -> Device:
    """The ``cpu-host`` device: this machine's peaks as ONNX Runtime reaches them (efficiency 1 by
    definition: the measured peak already is what the runtime achieves)."""
    from vtprune.runtime.report import _cpu_model

    mm, bw, ov = matmul_flops(threads), memory_bandwidth(threads), op_overheads(threads)
    cores = threads or os.cpu_count()
    measured = {"matmul": mm, "bandwidth": bw, "overhead": ov, "threads": threads, "runtime": "onnxruntime cpu"}
    return Device(
        "cpu-host", f"this machine: {_cpu_model()} ({cores} threads), peaks measured with ONNX Runtime",
        {"fp32": mm["flops"] / 1e12}, bw["bandwidth"] / 1e9, _mem_gb(), "fp32",
        efficiency={"compute": 1.0, "memory": 1.0}, op_overhead_us=ov["op_s"] * 1e6,
        run_overhead_us=ov["run_s"] * 1e6, io_overhead_us=ov["io_s"] * 1e6, op_count="all", runtime="onnxruntime-cpu",
        sources=("measured by vtprune.bench.microbench on this machine",), measured=measured,
    )  # fmt: skip


def _mem_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0
