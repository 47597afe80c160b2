"""Device peaks for ``vtprune predict``: dense tensor throughput per precision, DRAM bandwidth, memory.

Every Jetson row cites NVIDIA's published module specs (Jetson Orin / Thor datasheets and product pages,
the Orin Nano/NX "Super" JetPack 6.2 announcement). NVIDIA publishes INT8 *sparse* TOPS for Orin (GPU
only, DLA excluded here) and FP4 *sparse* TFLOPS for Thor; the dense and FP16 figures below are derived
with the architecture ratios stated per row (sparse = 2 x dense; Ampere FP16 tensor = INT8 / 2;
Blackwell FP16 = FP8 / 2 = FP4 / 4) and are marked ``uncertain``. FP32 is CUDA cores x 2 x max GPU clock.

Efficiency defaults (fraction of peak a good runtime reaches) come from TensorRT Edge-LLM's published AGX
Orin numbers (ANCHORS.md §10a): Qwen3-VL-2B prefill of 292 tokens in 45.7 ms is ~2 x 1.7e9 x 292 FLOPs
/ 45.7 ms ~ 22 TFLOP/s ~ 0.5 of 42.5 FP16 TFLOP/s; its 98.9 tok/s decode reads ~1 GB of INT4 weights per
token, ~0.5 of 204.8 GB/s. Per-op and per-run overheads of GPU runtimes are assumptions (uncertain).
(GPU rows fold the per-tensor binding cost into the per-run overhead.) ``cpu-host`` has no fixed row:
its peaks are measured on this machine by ``microbench``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TERA, GIGA = 1e12, 1e9


@dataclass(frozen=True)
class Device:
    """Peaks of one device. ``peak_tflops`` is dense, per precision; ``op_count`` says which graph nodes
    pay ``op_overhead_us`` (``all`` for ONNX Runtime on a CPU, ``gemm`` where a GPU runtime fuses the rest)."""

    name: str
    description: str
    peak_tflops: dict[str, float]
    mem_bandwidth_gbs: float
    memory_gb: float
    default_precision: str
    efficiency: dict[str, float] = field(default_factory=lambda: {"compute": 0.5, "memory": 0.5})
    op_overhead_us: float = 5.0
    run_overhead_us: float = 50.0
    io_overhead_us: float = 0.0
    op_count: str = "gemm"
    runtime: str = "tensorrt"
    sources: tuple[str, ...] = ()
    uncertain: tuple[str, ...] = ()
    measured: dict | None = None

    def to_dict(self, precision: str) -> dict:
        return {"name": self.name, "description": self.description, "precision": precision,
                "peak_flops": self.peak_tflops[precision] * TERA, "mem_bandwidth": self.mem_bandwidth_gbs * GIGA,
                "memory_bytes": self.memory_gb * 2**30, "efficiency": dict(self.efficiency),
                "op_overhead_us": self.op_overhead_us, "run_overhead_us": self.run_overhead_us,
                "io_overhead_us": self.io_overhead_us,
                "op_count": self.op_count, "runtime": self.runtime, "sources": list(self.sources),
                "uncertain": list(self.uncertain), "measured": self.measured}  # fmt: skip


_GPU_ASSUMED = ("fp16 and int8 dense peaks are derived, not published", "op_overhead_us", "run_overhead_us")
_ORIN_SRC = "NVIDIA Jetson Orin module datasheet / product page (developer.nvidia.com/embedded/jetson-modules)"
_SUPER_SRC = "NVIDIA blog 'JetPack 6.2 brings Super Mode to Jetson Orin Nano and Orin NX' (Jan 2025)"

DEVICES: dict[str, Device | None] = {
    # 1024 CUDA / 32 tensor cores @ 625 MHz; 40 INT8 sparse TOPS -> 20 dense; FP16 = 10; FP32 1024*2*0.625 GHz.
    # 128-bit LPDDR5 68 GB/s, 8 GB shared by CPU and GPU.
    "orin-nano-8gb": Device("orin-nano-8gb", "Jetson Orin Nano 8GB (15 W, 625 MHz GPU)",
                            {"fp32": 1.28, "fp16": 10.0, "int8": 20.0}, 68.0, 8, "fp16",
                            sources=(_ORIN_SRC,), uncertain=_GPU_ASSUMED),
    # Super mode (MAXN SUPER, JetPack 6.2): GPU 1020 MHz, 67 INT8 sparse TOPS -> 33.5 dense; 102 GB/s.
    "orin-nano-8gb-super": Device("orin-nano-8gb-super", "Jetson Orin Nano 8GB Super (MAXN SUPER, 1020 MHz GPU)",
                                  {"fp32": 2.09, "fp16": 16.75, "int8": 33.5}, 102.0, 8, "fp16",
                                  sources=(_SUPER_SRC,), uncertain=_GPU_ASSUMED),
    # 1024 CUDA / 32 tensor cores @ 918 MHz (25 W); "100 TOPS" includes 2 DLAs. GPU INT8 scaled from the Nano's
    # 40 sparse TOPS @ 625 MHz with the same core count: 58.8 sparse -> 29.4 dense. 128-bit LPDDR5 102.4 GB/s.
    "orin-nx-16gb": Device("orin-nx-16gb", "Jetson Orin NX 16GB (25 W, 918 MHz GPU)",
                           {"fp32": 1.88, "fp16": 14.7, "int8": 29.4}, 102.4, 16, "fp16",
                           sources=(_ORIN_SRC,), uncertain=_GPU_ASSUMED + ("int8 scaled by GPU clock",)),
    # Super mode (40 W MAXN SUPER): GPU 1173 MHz -> 75 sparse / 37.5 dense INT8 by the same scaling.
    "orin-nx-16gb-super": Device("orin-nx-16gb-super", "Jetson Orin NX 16GB Super (MAXN SUPER, 1173 MHz GPU)",
                                 {"fp32": 2.40, "fp16": 18.8, "int8": 37.5}, 102.4, 16, "fp16",
                                 sources=(_SUPER_SRC,), uncertain=_GPU_ASSUMED + ("int8 scaled by GPU clock",)),
    # 1792 CUDA / 56 tensor cores @ 930 MHz; "200 TOPS" includes DLAs. GPU INT8 by per-core-clock scaling of the
    # 64GB part (170 sparse @ 64 TC, 1.3 GHz): 170*56/64*930/1300 = 106 sparse -> 53 dense. 204.8 GB/s.
    "agx-orin-32gb": Device("agx-orin-32gb", "Jetson AGX Orin 32GB (40 W, 930 MHz GPU)",
                            {"fp32": 3.33, "fp16": 26.5, "int8": 53.0}, 204.8, 32, "fp16",
                            sources=(_ORIN_SRC,), uncertain=_GPU_ASSUMED + ("int8 scaled by cores and clock",)),
    # 2048 CUDA / 64 tensor cores @ 1.3 GHz (MAXN); GPU 170 INT8 sparse TOPS (of 275 with DLAs) -> 85 dense;
    # FP16 42.5; FP32 2048*2*1.3 GHz = 5.3. 256-bit LPDDR5 204.8 GB/s, 64 GB.
    "agx-orin-64gb": Device("agx-orin-64gb", "Jetson AGX Orin 64GB (MAXN, 1.3 GHz GPU)",
                            {"fp32": 5.32, "fp16": 42.5, "int8": 85.0}, 204.8, 64, "fp16",
                            sources=(_ORIN_SRC,), uncertain=_GPU_ASSUMED),
    # Jetson AGX Thor (T5000): Blackwell GPU, 2560 CUDA / 96 tensor cores, 2070 FP4 sparse TFLOPS -> 1035 dense
    # FP4, 517 FP8, 259 FP16 (Blackwell ratios); INT8 assumed at the FP8 rate. FP32 2560*2*1.575 GHz = 8.1
    # (max GPU clock from the datasheet, uncertain). 256-bit LPDDR5X 273 GB/s, 128 GB.
    "thor": Device("thor", "Jetson AGX Thor T5000 (MAXN)",
                   {"fp32": 8.06, "fp16": 259.0, "int8": 517.0}, 273.0, 128, "fp16",
                   sources=("NVIDIA Jetson Thor product page / datasheet (Aug 2025)",),
                   uncertain=_GPU_ASSUMED + ("int8 assumed equal to the FP8 rate", "fp32 clock")),
    "cpu-host": None,  # measured here by vtprune.bench.microbench
}


def jetson_names() -> list[str]:
    return [name for name, d in DEVICES.items() if d is not None]
