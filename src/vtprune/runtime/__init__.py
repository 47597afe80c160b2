"""Runtimes: the PyTorch reference pipeline here; ONNX Runtime and TensorRT backends import lazily."""
