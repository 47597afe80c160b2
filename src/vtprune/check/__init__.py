"""Parity, the way every export is accepted: a bundle against the PyTorch reference (``validate``) and
every TensorRT engine against ONNX Runtime on the same feeds (``parity``)."""
