"""Memory an export needs, estimated before any model loads, and the plan that fits this machine.

A checkpoint's parameter count comes from its safetensors headers (nothing is loaded). The default plan
keeps an fp32 model as the validation reference and traces an fp16 copy of it (``export.precision``);
for a real-size checkpoint that is 6 bytes per parameter before the exporter's own needs (7B: 42 GB).
When that does not fit, an fp16 export is **lean**: the model is loaded once, straight in fp16, traced,
and is itself the validation reference (PyTorch fp16 on the CPU). ONNX Runtime's CPU provider computes
fp16 graphs in fp32 (it converts the weights when the session is created), so a bundle whose full
validation would not fit beside the reference is validated as a **slice** (``check.validate``): the vision
and embedding graphs whole, the decoder exported again with its first layers only. What ran is recorded
in the manifest. An export that does not fit even lean is refused with the measured requirement.

Factors are bytes per parameter, from exports of Qwen2.5-VL-3B and LLaVA-1.5-7B at their published
sizes (benchmarks/results/scale): the exporter's peak above the loaded model is small (the decoder graph
is traced with fake tensors and saved tensor by tensor).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from vtprune.errors import ConfigError

DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
HEADROOM = 2 * 1024**3  # the runtime, the exporter's graph, the sample image's activations
EXPORT_OVERHEAD = 0.25  # bytes per parameter above the loaded model while tracing and saving (measured)
# ONNX Runtime on the CPU holding an fp16 bundle: the file's bytes (2) while the session is created, and
# the weights converted to fp32 (4).
ORT_FP16_BYTES = 6
SMALL = 1_000_000_000  # below a billion parameters: the default plan, whatever the machine


def checkpoint_parameters(path: Path) -> int | None:
    """Elements of every tensor in the checkpoint's safetensors files (headers only); None when the
    directory has none (a built-in name, pickle weights)."""
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total


def available_memory() -> int:
    """Bytes this process can allocate without swapping: ``MemAvailable`` (page cache it may reclaim
    included), within a cgroup limit when one is set."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max":
                avail = min(avail, int(limit) - int(Path(usage_file).read_text()))
        except (OSError, ValueError):
            pass
    return avail


@dataclass(frozen=True)
class MemoryPlan:
    """How an export runs on this machine."""

    parameters: int | None
    lean: bool  # load once in the export dtype; that model is the validation reference
    slice_validation: bool  # validate the decoder as its first layers (the full bundle would not fit)
    need: int  # bytes the chosen plan needs (export; validation counted separately)
    available: int

    def to_dict(self) -> dict[str, object]:
        return {"parameters": self.parameters, "reference": "export dtype (lean)" if self.lean else "fp32",
                "validation": "slice" if self.slice_validation else "full",
                "estimated_need_gb": round(self.need / 1e9, 1), "available_gb": round(self.available / 1e9, 1)}


def plan_export(path: Path, dtype: str, validate: bool, available: int | None = None) -> MemoryPlan:
    """The plan for exporting the checkpoint at ``path`` in ``dtype``, or ``ConfigError`` (before anything
    loads) when even the lean plan would not fit, naming what it needs."""
    params = checkpoint_parameters(path)
    avail = available_memory() if available is None else available
    if params is None or params < SMALL:
        return MemoryPlan(params, False, False, 0, avail)
    size = {"fp32": 4, "fp16": 2}[dtype]
    default = int(params * (4 + (size if dtype != "fp32" else 0) + EXPORT_OVERHEAD)) + HEADROOM
    if default <= avail:
        full = int(params * (4 + ORT_FP16_BYTES if dtype != "fp32" else 4 + 8)) + HEADROOM
        return MemoryPlan(params, False, validate and full > avail, default, avail)
    lean = int(params * (size + EXPORT_OVERHEAD)) + HEADROOM
    if dtype == "fp32" or lean > avail:
        hint = ("; export --dtype fp16, which needs " f"{(params * (2 + EXPORT_OVERHEAD) + HEADROOM) / 1e9:.0f} GB"
                if dtype == "fp32" else "; free memory or export on a larger machine")  # fmt: skip
        need = default if dtype == "fp32" else lean
        raise ConfigError(f"exporting {path} ({params / 1e9:.2f} B parameters) in {dtype} needs about "
                          f"{need / 1e9:.0f} GB of memory and {avail / 1e9:.0f} GB is available{hint}")  # fmt: skip
    full = int(params * (size + ORT_FP16_BYTES)) + HEADROOM
    return MemoryPlan(params, True, validate and full > avail, lean, avail)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps freed blocks below its mmap
    threshold in the heap; after an export of GBs of weights that is GBs of resident memory)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass

