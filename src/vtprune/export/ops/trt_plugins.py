"""TensorRT plugins for ``vtprune::GraphPropagate`` and ``vtprune::TopKRoute``: IPluginV3 in Python, whose
``enqueue`` launches the fused Triton kernels of ``vtprune.export.ops.kernels`` on TensorRT's stream.

Nothing here registers anything on import. ``load_plugins(trt)`` registers the two creators with the
given TensorRT module (``tensorrt``; TensorRT-RTX 1.7 has no plugin layers), under the empty namespace
(the ONNX parser's default) and ``vtprune`` (the node domain, which parsers from TensorRT 10.10 read as
the namespace). The engine then needs Python, Triton and torch at run time, and the same
``load_plugins`` call before it is deserialized.

The launch side (``launch_graph_propagate``, ``launch_topk_route``) is plain Python over raw pointers,
so it is tested without TensorRT: on a GPU with CUDA buffers, and on the CPU in Triton's interpreter.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

PLUGIN_OPS = ("GraphPropagate", "TopKRoute")
NAMESPACES = ("", "vtprune")
VERSION = "1"
FIELDS = {"GraphPropagate": (("theta", "f"), ("tau", "f"), ("iters", "i")), "TopKRoute": (("k", "i"),)}
_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.bool: "|b1", torch.int64: "<i8", torch.uint8: "|u1"}


# --- launch side: raw pointers -> tensors -> kernels --------------------------------------------
@dataclass
class _CudaArray:
    """A device pointer seen through ``__cuda_array_interface__`` (torch wraps it without copying)."""

    ptr: int
    shape: tuple[int, ...]
    typestr: str

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.typestr, "data": (self.ptr, False), "version": 3}


def tensor_at(ptr: int, shape: Sequence[int], dtype: torch.dtype, device: str = "cuda") -> Tensor:
    """A tensor over memory TensorRT owns: ``device`` ``cuda`` (a device pointer) or ``cpu`` (tests)."""
    shape = tuple(int(d) for d in shape)
    if device == "cpu":
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype).view(shape)
    if dtype == torch.bfloat16:  # no typestr for bf16: view the bytes as int16
        return torch.as_tensor(_CudaArray(ptr, shape, "<i2"), device=device).view(torch.bfloat16)
    return torch.as_tensor(_CudaArray(ptr, shape, _TYPESTR[dtype]), device=device)


def launch_graph_propagate(
    shape: Sequence[int], dtype: torch.dtype, x: int, valid: int, scores: int, workspace: int,
    theta: float, tau: float, iters: int, device: str = "cuda",
) -> None:  # fmt: skip
    """GraphPropagate over raw buffers: x (B, N, D) ``dtype``, valid (B, N) bool -> scores (B, N) fp32."""
    from vtprune.export.ops import kernels

    b, n, d = shape
    size = kernels.workspace_layout(b, n, d).size
    kernels.graph_propagate(
        tensor_at(x, (b, n, d), dtype, device), tensor_at(valid, (b, n), torch.bool, device), theta, tau, iters,
        out=tensor_at(scores, (b, n), torch.float32, device),
        workspace=tensor_at(workspace, (size,), torch.uint8, device),
    )  # fmt: skip


def launch_topk_route(
    shape: Sequence[int], dtype: torch.dtype, x: int, scores: int, tokens: int, indices: int, workspace: int,
    k: int, device: str = "cuda",
) -> None:  # fmt: skip
    """TopKRoute over raw buffers: x (B, N, D), scores (B, N) -> tokens (B, k, D), indices (B, k) int64."""
    from vtprune.export.ops import kernels

    b, n, d = shape
    kernels.topk_route(
        tensor_at(x, (b, n, d), dtype, device), tensor_at(scores, (b, n), torch.float32, device), k,
        tokens=tensor_at(tokens, (b, k, d), dtype, device), indices=tensor_at(indices, (b, k), torch.int64, device),
        workspace=tensor_at(workspace, (kernels.topk_workspace_bytes(b, n),), torch.uint8, device),
    )  # fmt: skip


def workspace_bytes(op: str, shape: Sequence[int]) -> int:
    """Scratch bytes an op needs for (B, N, D) tokens."""
    from vtprune.export.ops import kernels

    b, n, d = shape
    return kernels.workspace_layout(b, n, d).size if op == "GraphPropagate" else kernels.topk_workspace_bytes(b, n)


def parse_fields(op: str, fields: dict[str, Any]) -> dict[str, float | int]:
    """Plugin attributes from the ONNX node's fields: floats for ``f``, ints for ``i``; all required."""
    missing = [name for name, _ in FIELDS[op] if name not in fields]
    if missing:
        raise ValueError(f"{op} plugin needs the attribute(s) {', '.join(missing)}")
    cast = {"f": float, "i": int}
    return {name: cast[kind](np.asarray(fields[name]).reshape(-1)[0]) for name, kind in FIELDS[op]}


# --- TensorRT side ------------------------------------------------------------------------------
def supports_plugins(trt: ModuleType) -> bool:
    """Whether this TensorRT can add IPluginV3 layers (TensorRT-RTX 1.7 cannot)."""
    return hasattr(trt.INetworkDefinition, "add_plugin_v3") and hasattr(trt, "IPluginCreatorV3One")


def load_plugins(trt: ModuleType) -> list[Any]:
    """Register the vtprune plugin creators with ``trt``'s plugin registry (once); returns the creators."""
    if not supports_plugins(trt):
        raise RuntimeError(f"{trt.__name__} {trt.__version__} has no IPluginV3 layers")
    registry = trt.get_plugin_registry()
    creators = []
    for op in PLUGIN_OPS:
        for ns in NAMESPACES:
            found = registry.get_creator(op, VERSION, ns)
            if found is None:
                found = _classes(trt)[1](op, ns)
                registry.register_creator(found, ns)
            creators.append(found)
    return creators


@functools.cache
def _classes(trt: ModuleType) -> tuple[type, type]:
    """The plugin and creator classes for one TensorRT module (built once per module)."""
    dt = trt.DataType
    to_torch = {dt.FLOAT: torch.float32, dt.HALF: torch.float16, dt.BF16: torch.bfloat16}
    floats = set(to_torch)

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, op: str, namespace: str, attrs: dict[str, float | int]) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.op, self.attrs = op, attrs
            self.plugin_name, self.plugin_version, self.plugin_namespace = op, VERSION, namespace
            self.num_outputs = 1 if op == "GraphPropagate" else 2

        def get_capability_interface(self, kind: Any) -> Any:
            return self

        def clone(self) -> Any:
            return Plugin(self.op, self.plugin_namespace, dict(self.attrs))

        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            return [dt.FLOAT] if self.op == "GraphPropagate" else [input_types[0], dt.INT64]

        def get_output_shapes(self, inputs: list[Any], shape_inputs: list[Any], exprs: Any) -> list[Any]:
            x = inputs[0]  # (B, N, D)
            if self.op == "GraphPropagate":
                return [trt.DimsExprs([x[0], x[1]])]
            k = exprs.constant(int(self.attrs["k"]))
            return [trt.DimsExprs([x[0], k, x[2]]), trt.DimsExprs([x[0], k])]

        def supports_format_combination(self, pos: int, in_out: list[Any], num_inputs: int) -> bool:
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            want = {"GraphPropagate": [floats, {dt.BOOL}, {dt.FLOAT}],
                    "TopKRoute": [floats, {dt.FLOAT}, {in_out[0].desc.type}, {dt.INT64}]}[self.op]  # fmt: skip
            return desc.type in want[pos]

        def configure_plugin(self, inputs: list[Any], outputs: list[Any]) -> None:
            pass  # nothing to precompute: enqueue reads shapes and types from its descriptors

        def on_shape_change(self, inputs: list[Any], outputs: list[Any]) -> None:
            pass  # as configure_plugin

        def get_workspace_size(self, inputs: list[Any], outputs: list[Any]) -> int:
            return workspace_bytes(self.op, tuple(inputs[0].max))

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def get_fields_to_serialize(self) -> Any:
            fields = [_field(trt, name, self.attrs[name], kind) for name, kind in FIELDS[self.op]]
            return trt.PluginFieldCollection(fields)

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> None:  # noqa: ANN001
            shape, dtype = tuple(input_desc[0].dims), to_torch[input_desc[0].type]
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                if self.op == "GraphPropagate":
                    launch_graph_propagate(shape, dtype, inputs[0], inputs[1], outputs[0], workspace,
                                           self.attrs["theta"], self.attrs["tau"], self.attrs["iters"])  # fmt: skip
                else:
                    launch_topk_route(shape, dtype, inputs[0], inputs[1], outputs[0], outputs[1], workspace,
                                      self.attrs["k"])  # fmt: skip

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self, op: str, namespace: str) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = op, namespace, VERSION
            self.field_names = trt.PluginFieldCollection([_field(trt, n, None, kind) for n, kind in FIELDS[op]])

        def create_plugin(self, name: str, fields: Any, phase: Any) -> Any:
            attrs = parse_fields(self.name, {f.name: f.data for f in fields})
            return Plugin(self.name, self.plugin_namespace, attrs)

    return Plugin, Creator


def _field(trt: ModuleType, name: str, value: float | int | None, kind: str) -> Any:
    dtype, ftype = (np.float32, trt.PluginFieldType.FLOAT32) if kind == "f" else (np.int32, trt.PluginFieldType.INT32)
    return trt.PluginField(name, np.array([] if value is None else [value], dtype=dtype), ftype)
