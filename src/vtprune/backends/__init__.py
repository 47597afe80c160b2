"""Runners over exported bundles: ONNX Runtime (``ort``, the embedded default) and TensorRT (``trt``:
engine builds and the engine runner). Both implement the runner contract of ``runtime.generate``."""
