"""ONNX Runtime's CPU kernels at the pocket VLM's shapes: what one matrix product and one attention cost in
each form vtprune writes, in prefill (M = 102 rows: G-Prune 64's prompt) and in decode (M = 1).

    python benchmarks/cpu_kernels.py [--out benchmarks/results/pocket/cpu-kernels]

One-node graphs, each in its own session with 2 intra-op threads: the MLP's gate|up product (576 -> 3072) as
an fp32 ``MatMul``, ``DynamicQuantizeLinear`` + ``MatMulInteger`` (``--weights w8a8``'s form, written by
``quantize_dynamic``), and ``MatMulNBits`` with 4 and 8 bits, symmetric or with zero points (uint8 or
float), at accuracy levels 0 (fp32 compute) and 4 (int8 dot products); and the causal attention of one
decoder layer (9 query heads, 3 key/value heads, head size 64) at 102 and 293 rows as
``GroupQueryAttention`` and as MatMul / Softmax / MatMul. Best of 5 repetitions of 200 runs (30 for the
slow forms); GFLOP/s counts 2 per multiply-add. Writes cpu_kernels.json and cpu_kernels.md with the
environment.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

K, N = 576, 3072  # the pocket decoder's gate|up product
HEADS, KV_HEADS, HEAD = 9, 3, 64


def bench(model: Any, feeds: dict[str, np.ndarray], runs: int = 200) -> float:
    """Best mean microseconds per run over 5 repetitions."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 2, 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for _ in range(max(3, runs // 20)):
        session.run(None, feeds)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(runs):
            session.run(None, feeds)
        best = min(best, (time.perf_counter() - start) / runs * 1e6)
    return best


def model_of(nodes: list, inputs: list, inits: list, domains: tuple[str, ...] = ()) -> Any:
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 21)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def matmul_rows(m: int) -> list[dict[str, Any]]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    x = {"x": rng.standard_normal((1, m, K)).astype(np.float32)}
    inp = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, K])]
    fp32 = model_of([helper.make_node("MatMul", ["x", "W"], ["y"])], inp, [numpy_helper.from_array(w, "W")])
    flop = 2 * m * K * N
    rows = [("fp32 MatMul", bench(fp32, x))]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(fp32, f"{tmp}/a.onnx")
        quantize_dynamic(f"{tmp}/a.onnx", f"{tmp}/b.onnx", weight_type=QuantType.QInt8)
        rows.append(("w8a8: DynamicQuantizeLinear + MatMulInteger", bench(onnx.load(f"{tmp}/b.onnx"), x)))
    for bits in (4, 8):
        for symmetric in (True, False):
            for level in (4, 0):
                slow = bits == 8 and level == 0
                cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric, accuracy_level=level,
                                                   bits=bits)  # fmt: skip
                q = MatMulNBitsQuantizer(copy.deepcopy(fp32), algo_config=cfg)
                q.process()
                form = "symmetric" if symmetric else "uint8 zero points"
                rows.append((f"MatMulNBits {bits}-bit, {form}, level {level}",
                             bench(q.model.model, x, 30 if slow else 200)))  # fmt: skip
    # float zero points: the exact form of an affine (GGUF Q4_1) block, which ONNX Runtime dequantizes per call
    codes = rng.integers(0, 256, (N, K // 32, 16), dtype=np.uint8)
    scales = (rng.random(N * K // 32).astype(np.float32) + 0.5) * 0.01
    zeros = (rng.random(N * K // 32) * 15).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=K, N=N, bits=4,
                            block_size=32, accuracy_level=4)  # fmt: skip
    inits = [numpy_helper.from_array(a, n) for a, n in ((codes, "B"), (scales, "S"), (zeros, "Z"))]
    rows.append(("MatMulNBits 4-bit, float zero points, level 4",
                 bench(model_of([node], inp, inits, ("com.microsoft",)), x, 30)))  # fmt: skip
    return [{"kernel": k, "rows": m, "us": us, "gflops": flop / us / 1e3} for k, us in rows]


def attention_rows(s: int) -> list[dict[str, Any]]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, s, HEADS * HEAD)).astype(np.float32)
    kv = {n: rng.standard_normal((1, s, KV_HEADS * HEAD)).astype(np.float32) for n in ("k", "v")}
    f = lambda name, shape, t=TensorProto.FLOAT: helper.make_tensor_value_info(name, t, shape)  # noqa: E731
    inputs = [f("q", [1, s, HEADS * HEAD]), f("k", [1, s, KV_HEADS * HEAD]), f("v", [1, s, KV_HEADS * HEAD])]
    gqa = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sl", "tl"], ["y"],
                           domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS)  # fmt: skip
    extra = [f("pk", [1, KV_HEADS, 0, HEAD]), f("pv", [1, KV_HEADS, 0, HEAD]), f("sl", [1], TensorProto.INT32),
             f("tl", [], TensorProto.INT32)]  # fmt: skip
    feeds = {"q": q, **kv, "pk": np.zeros((1, KV_HEADS, 0, HEAD), np.float32),
             "pv": np.zeros((1, KV_HEADS, 0, HEAD), np.float32), "sl": np.array([s - 1], np.int32),
             "tl": np.array(s, np.int32)}  # fmt: skip
    rows = [("GroupQueryAttention", bench(model_of([gqa], inputs + extra, [], ("com.microsoft",)), feeds))]
    g = HEADS // KV_HEADS
    nodes = [helper.make_node("Reshape", ["q", "sq"], ["q5"]), helper.make_node("Transpose", ["q5"], ["qt"],
             perm=[0, 2, 3, 1, 4]), helper.make_node("Reshape", ["k", "sk"], ["k5"]),
             helper.make_node("Transpose", ["k5"], ["kt"], perm=[0, 2, 3, 4, 1]),
             helper.make_node("Reshape", ["v", "sk"], ["v5"]), helper.make_node("Transpose", ["v5"], ["vt"],
             perm=[0, 2, 3, 1, 4]), helper.make_node("MatMul", ["qt", "kt"], ["a"]),
             helper.make_node("Mul", ["a", "scale"], ["b"]), helper.make_node("Add", ["b", "mask"], ["c"]),
             helper.make_node("Softmax", ["c"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vt"], ["o"]),
             helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 3, 1, 2, 4]),
             helper.make_node("Reshape", ["ot", "so"], ["y"])]  # fmt: skip
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
             (("sq", [1, s, KV_HEADS, g, HEAD]), ("sk", [1, s, KV_HEADS, 1, HEAD]), ("so", [1, s, HEADS * HEAD]))]
    inits += [numpy_helper.from_array(np.array(HEAD**-0.5, np.float32), "scale"),
              numpy_helper.from_array(np.triu(np.full((s, s), -1e9, np.float32), 1), "mask")]  # fmt: skip
    rows.append(("MatMul / Softmax / MatMul", bench(model_of(nodes, inputs, inits), {"q": q, **kv})))
    flop = 2 * 2 * HEADS * s * s * HEAD  # q.k and p.v over the full square (the causal half is masked)
    return [{"kernel": k, "rows": s, "us": us, "gflops": flop / us / 1e3} for k, us in rows]


def main() -> None:
    from vtprune.runtime.report import environment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pocket/cpu-kernels"))
    args = ap.parse_args()
    result = {"date": time.strftime("%Y-%m-%d"), "environment": environment(),
              "matmul": {"k": K, "n": N, "rows": matmul_rows(102) + matmul_rows(1)},
              "attention": {"heads": HEADS, "kv_heads": KV_HEADS, "head_size": HEAD,
                            "rows": attention_rows(102) + attention_rows(293)}}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "cpu_kernels.md").write_text(to_markdown(result))
    print(to_markdown(result))


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# ONNX Runtime CPU kernels at the pocket VLM's shapes", "",
             f"{result['date']}; {env['cpu']}, {env['cores']} cores, ONNX Runtime "
             f"{env['libraries'].get('onnxruntime', '?')}; 1-minute load {env['load_avg']}. One-node graphs, 2 "
             "intra-op threads, best of 5 repetitions.", "",
             f"Matrix product {result['matmul']['k']} -> {result['matmul']['n']} (the MLP's gate|up):", "",
             "| kernel | rows | µs | GFLOP/s |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['kernel']} | {r['rows']} | {r['us']:.1f} | {r['gflops']:.0f} |" for r in result["matmul"]["rows"]]
    a = result["attention"]
    lines += ["", f"Causal attention of one layer ({a['heads']} query heads, {a['kv_heads']} key/value heads, head "
              f"size {a['head_size']}; GFLOP/s over the full square):", "", "| kernel | rows | µs | GFLOP/s |",
              "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['kernel']} | {r['rows']} | {r['us']:.1f} | {r['gflops']:.0f} |" for r in a["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
