"""TensorRT backend: build engines from ONNX with full TensorRT or TensorRT for RTX.

Importing this package imports no TensorRT module; ``import_tensorrt`` does, when a build is asked for.
"""

from vtprune.backends.trt.build import (
    PRECISIONS,
    BuildResult,
    EngineBuildError,
    OnnxParseError,
    ParserIssue,
    build_engine,
    import_tensorrt,
    resolve_target,
)

__all__ = [
    "PRECISIONS",
    "BuildResult",
    "EngineBuildError",
    "OnnxParseError",
    "ParserIssue",
    "build_engine",
    "import_tensorrt",
    "resolve_target",
]
