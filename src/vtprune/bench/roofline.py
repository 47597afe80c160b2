"""Roofline arithmetic: FLOPs and bytes moved per stage, and the time a device needs for them.

    time = max(FLOPs / (peak_flops * eff_compute), bytes / (bandwidth * eff_memory))
           + ops * op_overhead + runs * run_overhead + tensors * io_overhead

Decoder work is analytic (the same MAC count as ``vtprune.flops``); bytes are weights read once per
graph run, an unfused activation traffic model and the KV cache. All functions are pure arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtprune.flops import TextDims

# Bytes per element: weights, activations, KV cache. int8 = W8A8 GEMMs at the INT8 peak with FP16 between
# GEMMs and an FP16 KV cache.
PRECISION_BYTES = {"fp32": (4, 4, 4), "fp16": (2, 2, 2), "int8": (1, 2, 2)}


@dataclass(frozen=True)
class Work:
    """What a stage does: FLOPs, bytes moved, graph ops that pay a fixed overhead, graph runs, and the
    input/output tensors bound for those runs."""

    flops: float
    bytes: float
    ops: int = 0
    runs: int = 0
    tensors: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.bytes + other.bytes, self.ops + other.ops,
                    self.runs + other.runs, self.tensors + other.tensors)  # fmt: skip


@dataclass(frozen=True)
class Peaks:
    """Device peaks a prediction uses (FLOP/s, B/s, fractions reached, seconds of overhead)."""

    flops: float
    bandwidth: float
    eff_compute: float = 1.0
    eff_memory: float = 1.0
    op_overhead_s: float = 0.0
    run_overhead_s: float = 0.0
    io_overhead_s: float = 0.0


@dataclass(frozen=True)
class Estimate:
    compute_ms: float
    memory_ms: float
    overhead_ms: float
    total_ms: float
    bound: str

    def to_dict(self, work: Work) -> dict:
        return {"flops": work.flops, "bytes": work.bytes, "ops": work.ops, "runs": work.runs, "tensors": work.tensors,
                "compute_ms": self.compute_ms, "memory_ms": self.memory_ms, "overhead_ms": self.overhead_ms,
                "bound": self.bound}  # fmt: skip


def roofline(work: Work, peaks: Peaks) -> Estimate:
    """Time of ``work`` on ``peaks``; ``bound`` names the largest term."""
    compute = work.flops / (peaks.flops * peaks.eff_compute) * 1e3
    memory = work.bytes / (peaks.bandwidth * peaks.eff_memory) * 1e3
    fixed = work.ops * peaks.op_overhead_s + work.runs * peaks.run_overhead_s + work.tensors * peaks.io_overhead_s
    overhead = fixed * 1e3
    bound = "overhead" if overhead > max(compute, memory) else "compute" if compute >= memory else "memory"
    return Estimate(compute, memory, overhead, max(compute, memory) + overhead, bound)


# --- decoder -----------------------------------------------------------------------------------------
def decoder_macs(dims: TextDims, t: int, c: int) -> int:
    """MACs of one decoder run on ``t`` new tokens attending to ``c`` positions (logits for the last one).
    With ``t == c == n`` this is ``vtprune.flops.prefill_macs(dims, n)``."""
    d, dq, dkv = dims.hidden, dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    per_layer = t * d * (2 * dq + 2 * dkv) + 2 * t * c * dq + 3 * t * d * dims.intermediate
    return dims.layers * per_layer + d * dims.vocab


def decoder_activation_elems(dims: TextDims, t: int, c: int) -> int:
    """Activation elements read + written by an unfused decoder run. Per layer: 2 RMSNorms 4td; q/k/v read
    3td, write t(dq+2dkv); RoPE r/w 2t(dq+dkv); attention reads q, writes its output (2t*dq) and writes,
    softmaxes and reads the h*t*c scores (4htc); o-proj t*dq + td; 2 residual adds 6td; SwiGLU 3td + 6tm.
    Plus the final norm (2td) and one row of logits (V)."""
    d, m, h = dims.hidden, dims.intermediate, dims.heads
    dq, dkv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    per_layer = t * (17 * d + 6 * dq + 4 * dkv + 6 * m) + 4 * h * t * c
    return dims.layers * per_layer + 2 * t * d + dims.vocab


def kv_cache_elems(dims: TextDims, t: int, past: int) -> int:
    """KV-cache elements moved by one run of a bundle's decoder graph: write the t new K/V rows, attention
    reads all c = past + t, and the graph's Concat(past, new) reads past and writes c rows again."""
    c = past + t
    return dims.layers * 2 * dims.kv_heads * dims.head_dim * (t + c + past + c)


def decoder_work(dims: TextDims, params: int, t: int, past: int, precision: str, ops: int, tensors: int = 0) -> Work:
    """One decoder graph run: all ``params`` weights read once, activations, KV cache; ``ops`` graph ops
    and ``tensors`` bound inputs/outputs pay the fixed overheads."""
    wb, ab, kb = PRECISION_BYTES[precision]
    c = past + t
    moved = params * wb + decoder_activation_elems(dims, t, c) * ab + kv_cache_elems(dims, t, past) * kb
    return Work(2.0 * decoder_macs(dims, t, c), float(moved), ops, 1, tensors)


def embed_work(hidden: int, tokens: int, precision: str) -> Work:
    """Embedding lookup of ``tokens`` rows: read them (weight bytes), write them (activation bytes)."""
    wb, ab, _ = PRECISION_BYTES[precision]
    return Work(0.0, float(tokens * hidden * (wb + ab)), 1, 1, 2)


def decode_work(dims: TextDims, params: int, prefill_len: int, steps: int, precision: str, ops: int,
                tensors: int = 0) -> Work:  # fmt: skip
    """``steps`` decode steps after a prefill of ``prefill_len`` tokens: per step one embedding lookup and
    one decoder run on 1 token with a growing cache (past = prefill_len + i)."""
    total = Work(0.0, 0.0)
    for i in range(steps):
        step = decoder_work(dims, params, 1, prefill_len + i, precision, ops, tensors)
        total = total + embed_work(dims.hidden, 1, precision) + step
    return total


def graph_work(flops: float, weight_params: int, activation_elems: float, precision: str, ops: int,
               tensors: int = 0) -> Work:  # fmt: skip
    """A counted ONNX graph (see ``costs.graph_cost``) at ``precision``, run once."""
    wb, ab, _ = PRECISION_BYTES[precision]
    return Work(flops, weight_params * wb + activation_elems * ab, ops, 1, tensors)
