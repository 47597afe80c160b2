"""TensorRT backend: a bundle's engines driven by the same generation loop as ONNX Runtime.

``TrtVlm`` is ``OrtVlm`` with each graph's ``InferenceSession`` replaced by an ``EngineSession`` that has
the same ``run(None, feeds)`` face over a TensorRT execution context:

- device buffers are torch tensors on the GPU; numpy feeds are copied in, device tensors are bound as they
  are (no copy);
- every call sets the input shapes (the engine's profiles bound them: ``vtprune build --max-seq``),
  sizes the outputs from the context's inferred shapes, binds addresses and enqueues on one CUDA stream;
- the KV cache stays on the device: ``present*`` outputs come back as device tensors and are fed back as
  the next step's ``past_key_values*`` inputs; logits and the vision outputs come back to the host;
- each call is timed with CUDA events (``EngineSession.gpu_ms``) besides the loop's host stage timers.

Engines load only after their metadata matches this TensorRT and GPU (``check_engine_compat``), and after
the fused plugins are registered when the engine was built with them. The CPU tests drive this module
with a stand-in for TensorRT's engine API backed by ONNX Runtime (tests/runtime/fake_trt.py); it has not
run on a GPU with TensorRT yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch

from vtprune.backends.ort import OrtVlm
from vtprune.config import SamplingConfig
from vtprune.errors import BackendUnavailableError, BundleError, InputError, VtpruneError

TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                "INT32": torch.int32, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


class EngineRunError(VtpruneError):
    """TensorRT failed to enqueue an engine (its log says why)."""


@dataclass(frozen=True)
class TensorSpec:
    """One IO tensor of an engine: name, direction, dtype and declared shape (-1 = set per call)."""

    name: str
    is_input: bool
    dtype: torch.dtype
    shape: tuple[int, ...]


def io_specs(engine: Any, trt: ModuleType) -> list[TensorSpec]:
    """The engine's IO tensors in binding order, with torch dtypes."""
    specs = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        kind = engine.get_tensor_dtype(name).name
        if kind not in TORCH_DTYPES:
            raise BundleError(f"engine tensor {name!r} has type {kind}, which the TensorRT runner does not bind")
        specs.append(TensorSpec(name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT, TORCH_DTYPES[kind],
                                tuple(engine.get_tensor_shape(name))))  # fmt: skip
    return specs


class EngineSession:
    """One engine behind ONNX Runtime's session face: ``get_inputs()``, ``get_outputs()``, ``run(None, feeds)``."""

    def __init__(self, engine: Any, trt: ModuleType, device: torch.device, keep_on_device: tuple[str, ...] = ()):
        self.engine, self.device, self.keep_on_device = engine, torch.device(device), keep_on_device
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineRunError("TensorRT could not create an execution context (out of GPU memory?)")
        self.specs = io_specs(engine, trt)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._dummy = torch.zeros(1, dtype=torch.uint8, device=self.device)  # the address of empty tensors
        self.gpu_ms: list[float] = []

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=s.name) for s in self.specs if s.is_input]

    def get_outputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=s.name) for s in self.specs if not s.is_input]

    def _bind(self, name: str, tensor: torch.Tensor) -> None:
        self.context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self._dummy.data_ptr())

    def _device_input(self, spec: TensorSpec, value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            tensor = value.to(self.device, spec.dtype)
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(value)).to(self.device, spec.dtype, non_blocking=True)
        return tensor.contiguous()

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        """Run the engine on ``feeds`` (numpy arrays or device tensors); outputs in ``output_names`` order
        (all outputs when ``None``): device tensors for names in ``keep_on_device``, numpy arrays otherwise."""
        missing = [s.name for s in self.specs if s.is_input and s.name not in feeds]
        if missing:
            raise InputError(f"engine inputs not given: {', '.join(missing)}")
        with torch.cuda.stream(self.stream):  # a no-op for None (the CPU stand-in)
            held = {}
            for spec in (s for s in self.specs if s.is_input):
                held[spec.name] = tensor = self._device_input(spec, feeds[spec.name])
                if not self.context.set_input_shape(spec.name, tuple(tensor.shape)):
                    raise InputError(f"{spec.name} of shape {tuple(tensor.shape)} is outside the engine's profile; "
                                     "rebuild with a larger --max-seq or --max-batch")  # fmt: skip
                self._bind(spec.name, tensor)
            unresolved = self.context.infer_shapes()
            if unresolved:
                raise InputError(f"TensorRT cannot infer output shapes; inputs lacking values: {unresolved}")
            for spec in (s for s in self.specs if not s.is_input):
                held[spec.name] = out = torch.empty(tuple(self.context.get_tensor_shape(spec.name)),
                                                    dtype=spec.dtype, device=self.device)  # fmt: skip
                self._bind(spec.name, out)
            self._enqueue()
        names = output_names or [s.name for s in self.specs if not s.is_input]
        return [held[n] if n.startswith(self.keep_on_device) else held[n].cpu().numpy() for n in names]

    def _enqueue(self) -> None:
        if not self.cuda:  # the CPU stand-in used by the tests
            if not self.context.execute_async_v3(0):
                raise EngineRunError("TensorRT failed to enqueue the engine")
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        ok = self.context.execute_async_v3(self.stream.cuda_stream)
        end.record(self.stream)
        self.stream.synchronize()
        if not ok:
            raise EngineRunError("TensorRT failed to enqueue the engine; run with --debug for TensorRT's log")
        self.gpu_ms.append(start.elapsed_time(end))


EngineLoader = Callable[[str], Any]  # graph name -> deserialized engine


class TrtVlm(OrtVlm):
    """A bundle's TensorRT engines loaded for generation (``vtprune run BUNDLE --backend trt``)."""

    backend_label = "tensorrt"

    def __init__(
        self, bundle: str | Path, verify: bool = True, sampling: SamplingConfig | None = None, *,
        device: str = "cuda", trt: ModuleType | None = None, load_engine: EngineLoader | None = None,
    ):  # fmt: skip
        self.device = torch.device(device)
        self._trt, self._load_engine = trt, load_engine
        # no prefix cache: the engine's prefill takes the prompt whole, as ``vtprune check`` compares it
        super().__init__(bundle, "cpu", None, verify, sampling, prefix_cache=False)

    def open_sessions(self, graphs: tuple[str, ...], provider: str, threads: int | None) -> dict[str, Any]:
        if self._load_engine is None:
            trt, flavour = self._import_tensorrt()
            self._trt, self._load_engine = trt, self._engine_loader(trt, flavour)
        keep = ("present",)  # KV cache outputs stay on the device
        return {g: EngineSession(self._load_engine(g), self._trt, self.device, keep) for g in graphs}

    def _import_tensorrt(self) -> tuple[ModuleType, str]:
        from vtprune.backends.trt.build import import_tensorrt

        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailableError(
                "--backend trt runs engines on an NVIDIA GPU and torch sees no CUDA device here; use the "
                "ONNX Runtime backend (the default) on this machine"
            )
        return import_tensorrt()

    def _engine_loader(self, trt: ModuleType, flavour: str) -> EngineLoader:
        from vtprune.backends.trt.engines import check_engine_compat

        major, minor = torch.cuda.get_device_capability(self.device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))

        def load(graph: str) -> Any:
            path = self.bundle / f"{graph}.engine"
            if path.name not in self.sealed.files:
                raise BundleError(f"{self.bundle} has no {path.name}; build the engines: vtprune build {self.bundle}")
            meta = self.sealed.read_json(f"{path.name}.json")
            check_engine_compat(meta, flavour, trt.__version__, f"sm{major}{minor}")
            if meta.get("plugins"):
                from vtprune.backends.trt.build import require_plugins

                require_plugins(trt, flavour)
            data = self.sealed.read(path.name)  # hashed from the bytes deserialized
            engine = runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise BundleError(f"TensorRT could not load {path}; rebuild it on this machine with --force")
            return engine

        return load

    def gpu_ms(self) -> dict[str, float]:
        """CUDA-event time of every engine call so far, summed per graph (empty off the GPU)."""
        return {g: float(sum(s.gpu_ms)) for g, s in self.sessions.items() if s.gpu_ms}
