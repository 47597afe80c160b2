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
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from vtprune.errors import ConfigError

DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
HEADROOM = 2_000_000_000  # the runtime, the exporter's graph, the activations (LLaVA-NeXT: 5 crops, 2.9k tokens)
EXPORT_OVERHEAD = 0.25  # bytes per parameter above the loaded model while tracing and saving (measured)
VISION_EXPORT_COPIES = 3  # the vision graph's weights held again while it is exported and checked (measured)
# ONNX Runtime on the CPU holding an fp16 bundle: the file's bytes (2) while the session is created, and
# the weights converted to fp32 (4).
ORT_FP16_BYTES = 6
SMALL = 1_000_000_000  # below a billion parameters: the default plan, whatever the machine
SLICE_LAYERS = 2  # decoder layers a slice validation keeps (``check.validate.validate_slice``)
_LAYER = re.compile(r"(?:language_model|^model)\.(?:model\.)?layers\.(\d+)\.")


@dataclass(frozen=True)
class Parts:
    """Parameter counts of a checkpoint by part, from its safetensors headers."""

    total: int
    vision: int  # vision tower, projector / merger
    embed: int
    head: int  # the LM head (the embedding again when tied)
    layers: int  # decoder layers
    per_layer: int

    @property
    def slice(self) -> int:
        """What a slice validation loads in ONNX Runtime: vision, embedding, head and ``SLICE_LAYERS`` layers."""
        return self.vision + self.embed + self.head + SLICE_LAYERS * self.per_layer


def checkpoint_parts(path: Path) -> Parts | None:
    """The checkpoint's parameters by part (headers only); None when the directory holds no safetensors
    files (a built-in name, pickle weights)."""
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return None
    total = vision = embed = head = decoder = 0
    layer_ids: set[int] = set()
    for file in files:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = math.prod(entry["shape"])
            total += count
            if any(k in name for k in ("vision", "visual", "multi_modal_projector", "image_newline")):
                vision += count
            elif "embed_tokens" in name:
                embed += count
            elif "lm_head" in name:
                head += count
            elif m := _LAYER.search(name):
                layer_ids.add(int(m.group(1)))
                decoder += count
    n = len(layer_ids)
    return Parts(total, vision, embed, head or embed, n, decoder // n if n else 0)


def checkpoint_parameters(path: Path) -> int | None:
    """Elements of every tensor in the checkpoint's safetensors files (headers only), or None."""
    parts = checkpoint_parts(path)
    return parts.total if parts else None


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
    need: int  # bytes the chosen plan needs at its peak (export, and validation when on)
    available: int

    def to_dict(self) -> dict[str, object]:
        return {"parameters": self.parameters, "reference": "export dtype (lean)" if self.lean else "fp32",
                "validation": "slice" if self.slice_validation else "full",
                "estimated_need_gb": round(self.need / 1e9, 1), "available_gb": round(self.available / 1e9, 1)}


def plan_export(
    path: Path, dtype: str, validate: bool, available: int | None = None, smoothing: bool = False
) -> MemoryPlan:
    """The plan for exporting the checkpoint at ``path`` in ``dtype``, or ``ConfigError`` (before anything
    loads) when even the lean plan would not fit, naming what it needs.

    Bytes per parameter (measured on Qwen2.5-VL-3B and LLaVA-1.5-7B, benchmarks/results/scale): the default
    plan holds an fp32 reference (4) and the traced copy; full validation adds the bundle in ONNX Runtime
    (fp16: 6, fp32: 8). The lean plan holds the model once (2), the vision graph's weights three more
    times while it is exported, and for a slice validation the slice's weights in ONNX Runtime (6).
    ``smoothing`` (``--weights w8a8``): the traced copy is a SmoothQuant-ed fp32 copy (4 more)."""
    parts = checkpoint_parts(path)
    avail = available_memory() if available is None else available
    if parts is None or parts.total < SMALL:
        return MemoryPlan(parts.total if parts else None, False, False, 0, avail)
    p, size = parts.total, {"fp32": 4, "fp16": 2}[dtype]
    default = int(p * (4 + (size if dtype != "fp32" or smoothing else 0) + EXPORT_OVERHEAD)) + HEADROOM
    if default <= avail:
        full = int(p * (4 + (ORT_FP16_BYTES if dtype != "fp32" else 8))) + HEADROOM
        if not validate or full <= avail:
            return MemoryPlan(p, False, False, max(default, full if validate else 0), avail)
        sliced = int(p * 4 + parts.slice * ORT_FP16_BYTES) + HEADROOM
        return MemoryPlan(p, False, True, max(default, sliced), avail)
    export = int(p * size + parts.vision * size * VISION_EXPORT_COPIES) + HEADROOM
    sliced = int(p * size + parts.slice * ORT_FP16_BYTES) + HEADROOM
    need = max(export, sliced) if validate else export
    if dtype == "fp32" or need > avail:
        if dtype == "fp32" and smoothing:
            hint, need = "; --weights w8a8 quantizes fp32 graphs: free memory or export on a larger machine", default
        elif dtype == "fp32":
            lean = max(int(p * 2 + parts.vision * 2 * VISION_EXPORT_COPIES), int(p * 2 + parts.slice * 6)) + HEADROOM
            hint, need = f"; export --dtype fp16, which needs about {lean / 1e9:.0f} GB", default
        elif validate and export <= avail:
            hint = f"; --no-validate needs about {export / 1e9:.0f} GB"
        else:
            hint = "; free memory or export on a larger machine"
        raise ConfigError(f"exporting {path} ({p / 1e9:.2f} B parameters) in {dtype} needs about "
                          f"{need / 1e9:.0f} GB of memory and {avail / 1e9:.0f} GB is available{hint}")  # fmt: skip
    return MemoryPlan(p, True, validate, need, avail)


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

