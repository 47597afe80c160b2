"""A stand-in for TensorRT's engine API, backed by ONNX Runtime on the CPU.

It has just enough of ``ICudaEngine`` / ``IExecutionContext`` (IO tensor queries, ``set_input_shape``,
``set_tensor_address``, ``infer_shapes``, ``get_tensor_shape``, ``execute_async_v3``) for the TensorRT
runner's own logic to be tested without a GPU: IO planning, shapes set per call, buffers bound by address
and read back from memory, the KV cache carried across steps. It is not TensorRT: the numbers are ORT's.
"""

from __future__ import annotations

import ctypes
import enum
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from vtprune.export.ops.trt_plugins import tensor_at


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT64 = "int64"
    INT32 = "int32"
    BOOL = "bool"
    DOUBLE = "float64"  # a type the runner does not bind


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


module = SimpleNamespace(DataType=DataType, TensorIOMode=TensorIOMode, __name__="fake_trt", __version__="0")
_ORT = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int64)": DataType.INT64,
        "tensor(int32)": DataType.INT32, "tensor(bool)": DataType.BOOL, "tensor(double)": DataType.DOUBLE}  # fmt: skip


def read(ptr: int, shape: tuple[int, ...], dtype: np.dtype, device: str = "cpu") -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    if device == "cuda":  # device memory, read on the current stream
        return tensor_at(ptr, shape, torch.from_numpy(np.zeros(0, dtype)).dtype, "cuda").cpu().numpy()
    return np.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype).reshape(shape).copy()


def write(ptr: int, array: np.ndarray, device: str = "cpu") -> None:
    if not array.nbytes:
        return
    if device == "cuda":
        tensor_at(ptr, array.shape, torch.from_numpy(array).dtype, "cuda").copy_(torch.from_numpy(array))
    else:
        ctypes.memmove(ptr, np.ascontiguousarray(array).ctypes.data, array.nbytes)


class FakeEngine:
    def __init__(self, onnx_path: Path, profile_max: dict[str, int] | None = None, device: str = "cpu") -> None:
        from vtprune.backends.ort import make_session

        self.session, self.device = make_session(onnx_path, "cpu", 1), device
        self.profile_max = profile_max or {}  # input name -> largest total size accepted
        self.io = {i.name: (TensorIOMode.INPUT, i) for i in self.session.get_inputs()}
        self.io |= {o.name: (TensorIOMode.OUTPUT, o) for o in self.session.get_outputs()}
        self.names = list(self.io)
        self.contexts: list[FakeContext] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io[name][0]

    def get_tensor_dtype(self, name: str) -> DataType:
        return _ORT[self.io[name][1].type]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self.io[name][1].shape)

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.shapes, self.addresses, self.outputs, self.calls = engine, {}, {}, {}, 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        declared = self.engine.get_tensor_shape(name)
        fits = len(shape) == len(declared) and all(d in (-1, s) for d, s in zip(declared, shape, strict=True))
        if not fits or int(np.prod(shape)) > self.engine.profile_max.get(name, 1 << 62):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        assert ptr, f"null address for {name}"
        self.addresses[name] = ptr
        return True

    def infer_shapes(self) -> list[str]:
        inputs = [n for n, (mode, _) in self.engine.io.items() if mode == TensorIOMode.INPUT]
        missing = [n for n in inputs if n not in self.addresses or n not in self.shapes]
        if missing:
            return missing
        dev = self.engine.device
        feeds = {n: read(self.addresses[n], self.shapes[n], self.engine.get_tensor_dtype(n).value, dev) for n in inputs}
        names = [o.name for o in self.engine.session.get_outputs()]
        self.outputs = dict(zip(names, self.engine.session.run(None, feeds), strict=True))
        return []

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.outputs[name].shape if name in self.outputs else self.shapes[name]

    def execute_async_v3(self, stream: int) -> bool:
        for name, value in self.outputs.items():
            write(self.addresses[name], value, self.engine.device)
        self.calls += 1
        return True
