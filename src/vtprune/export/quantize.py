"""Quantization of a bundle's language-model graphs, with ONNX Runtime's own tools.

``--weights int4|int8`` rewrites every MatMul of the embed, decoder, prefill and decode graphs whose weight
is a constant into ONNX Runtime's ``MatMulNBits`` (the format ORT-GenAI's model builder writes), through
``onnxruntime.quantization.matmul_nbits_quantizer``: round-to-nearest, symmetric, one fp32 scale per block
along the input dimension (int8: blocks of 128; int4: blocks of 32), ``accuracy_level`` 4 so the CPU
kernels quantize the activations to int8 per block and use int8 dot products (VNNI/AMX). At int4 the
embedding table's ``Gather`` becomes ``GatherBlockQuantized``.

Why these choices (pocket VLM, 2-core Xeon, benchmarks/results/pocket/quantized/): symmetric weights without
zero points are what ONNX Runtime's fast CPU kernels take. HQQ (data-free, float zero points) kept the
next-token distribution within 0.004 nats at int4 but decoded at 7 tokens/s against fp32's 35, and
round-to-nearest with accuracy level 0 fell back to a slow path at int8 (5 tokens/s). int8 in blocks of 128
prefills as fast as fp32 and stays within 0.03 nats; int4 in blocks of 32 is the more accurate int4 (blocks
of 128 moved the distribution by up to 1.5 nats).

``--weights w8a8`` also quantizes activations: every MatMul with a constant weight becomes ONNX Runtime's
``DynamicQuantizeLinear`` + ``MatMulInteger`` (``quantize_dynamic``: int8 weights per output channel, uint8
activations with one scale per tensor, computed at run time), which the CPU runs with int8 GEMM kernels
(VNNI/AMX) in prefill as well as decode. The decoder's activation outliers, which one scale per tensor
cannot hold, are first moved into the weights by SmoothQuant, calibrated on images (``export.smooth``,
applied to the model before its graphs are traced); down projections whose inputs keep extreme outliers
take the int8 ``MatMulNBits`` form above, whose activations are quantized per block of 128. A graph of an
unsmoothed model (``blockwise=None``) takes that form for every down projection, whose input carries the
largest outliers (pocket VLM: easy-vqa accuracy 0.98 falls to 0.39 with them in dynamic int8 unsmoothed);
it ran at under a third of the dynamic MatMuls' speed per MAC in the pocket decoder's prefill (ONNX
Runtime's profile). Down projections are found by shape: the only weights whose input width is not the
model width.

``--weights int8-trt`` (``quantize_static_lm``) is TensorRT's calibrated int8 language model: SmoothQuant first
(as w8a8), then every constant-weight MatMul of the decoder but the down projections in Q/DQ form, int8
weights per output channel and int8 activations with one static scale per tensor, symmetric (TensorRT's
explicit quantization), min-max calibrated on the decoder's prefill inputs for images (the SmoothQuant data
loader, ``export.smooth.prefill_feeds``) through ONNX Runtime's ``quantize_static``, one prompt at a time
(``CalibStridedMinMax`` 1). The down projections stay unquantized: one static scale cannot hold their
inputs, whose outliers differ from prompt to prompt even after smoothing (pocket VLM, 8 held-out easy-vqa
prompts: next-token KL 2.4 nats mean with them, 0.30 without). The activation scales are the prefill's; the
one-token decode steps read the same layers with values inside those ranges. ONNX Runtime runs the graph
too (validation, fallback), fusing the Q/DQ pairs into its int8 kernels. Pre-LLM methods only: the routed
prefill and decode graphs of in-LLM methods have no calibration loader yet. NVIDIA ModelOpt, the usual tool
for this, pins ``onnxruntime-gpu~=1.24`` and ``onnx 1.21`` (0.47.0), which cannot install beside vtprune's
pins. fp8 is not written: ONNX Runtime's float8 quantization sets each scale from a Gaussian fit to the
tensor's standard deviation, which clips the decoder's outliers (pocket VLM: next-token KL above 8 nats),
and with absolute-maximum scales it still moved the distribution by over 5 nats.

``--vision int8`` (``quantize_vision``) quantizes the vision encoder and projector too, with static
activation scales calibrated on images; its pruning stage stays fp32.

What stays fp32 (the manifest lists these islands): the vision graph's pruning stage (the whole vision
graph unless ``--vision int8``), and every in-LLM selector (ALVTS's low-rank factors, the initializers
named ``alvts_*``), so token choices are made in full precision. Quantized bundles run in ONNX Runtime
(CPU, CUDA); TensorRT builds need the Q/DQ form, so ``vtprune build`` refuses these graphs with one line.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vtprune.errors import ConfigError, InternalError

WEIGHT_FORMATS = {"int8": 8, "int4": 4, "w8a8": 8, "int4-trt": 4, "int8-trt": 8}
BLOCK_SIZE = {"int8": 128, "int4": 32, "w8a8": 128, "int4-trt": 32}  # w8a8: the down projections' MatMulNBits
# Q/DQ forms TensorRT builds (the others are ONNX Runtime's MatMulNBits / MatMulInteger)
TRT_WEIGHTS = ("int4-trt", "int8-trt")
STATIC_WEIGHTS = ("int8-trt",)  # activations too, with static scales calibrated on images
SMOOTHED_WEIGHTS = ("w8a8", "int8-trt")  # SmoothQuant folded in first (``export.smooth``)
ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits on the CPU (ORT's fastest x86 path)
QUANTIZED_GRAPHS = ("embed", "decoder", "prefill", "decode")
FP32_WEIGHT_PREFIXES = ("alvts_",)  # in-LLM selector factors: token choices stay fp32


def check_weights(weights: str | None, dtype: str) -> None:
    _check_format("--weights", weights, tuple(WEIGHT_FORMATS), dtype)


def _check_format(flag: str, value: str | None, choices: tuple[str, ...], dtype: str) -> None:
    """A quantized format is one of ``choices`` and quantizes fp32 graphs."""
    if value is None:
        return
    if value not in choices:
        raise ConfigError(f"{flag} {value}: choose one of {', '.join(choices)}")
    if dtype != "fp32":
        raise ConfigError(f"{flag} {value} quantizes fp32 graphs; drop --dtype {dtype}")


def quantize_graph(path: Path, weights: str, blockwise: list[str] | None = None) -> dict[str, Any]:
    """Rewrite ``path`` in place with ``weights`` (int4 / int8) MatMul (and int4 Gather) weights; returns what
    the manifest records (format, method, block size, quantized node count, the MatMuls kept in fp32).
    ``blockwise`` (w8a8 of a graph traced from a SmoothQuant-ed model, ``export.smooth``): the down
    projections, by module name (``layers.11.mlp.down_proj``), that keep block-wise activations; every
    other MatMul takes dynamic int8 ones. None: an unsmoothed graph, every down projection block-wise."""
    import onnx

    from vtprune.export.onnx_io import save_atomic

    model = onnx.load(str(path))
    consts = {i.name for i in model.graph.initializer}
    selector = {name for name in consts if name.startswith(FP32_WEIGHT_PREFIXES)}
    islands = [n.name for n in model.graph.node if n.op_type == "MatMul" and selector & set(n.input)]
    outliers = [] if weights != "w8a8" else down_projections(model, blockwise)
    if weights == "w8a8":
        model = _dynamic(model, islands + outliers)
    on_grid = {}
    if weights in ("int4", "int4-trt"):  # weights already on a GGUF-style grid are written on it exactly
        from vtprune.export.grid import quantize_on_grid

        form = "qdq" if weights in TRT_WEIGHTS else "ort"
        model, on_grid = quantize_on_grid(model, ACCURACY_LEVEL, set(islands), form)
    for config in _configs(weights):
        model = _run_quantizer(model, config, islands + on_grid.get("fp32_matmuls", []))
    for node in model.graph.node:  # (int4-trt: no MatMulNBits; ONNX Runtime fuses its Q/DQ pairs at load)
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", ACCURACY_LEVEL))
    kinds = [n.op_type for n in model.graph.node]
    save_atomic(model, path)
    quantized_ops = ("MatMulNBits", "GatherBlockQuantized", "DequantizeLinear", "MatMulInteger")
    record = {"weights": weights, "method": "rtn-symmetric", "block_size": BLOCK_SIZE[weights],
              "accuracy_level": None if weights in TRT_WEIGHTS else ACCURACY_LEVEL,
              "form": "qdq" if weights in TRT_WEIGHTS else "ort",
              "quantized_nodes": sum(kinds.count(op) for op in quantized_ops), "fp32_matmuls": islands}  # fmt: skip
    if on_grid.get("int4_affine") or on_grid.get("int8"):
        record |= {"method": "own grid where the weights sit on one, else rtn-symmetric",
                   "on_grid": {"int4_affine": on_grid["int4_affine"], "int8": on_grid["int8"],
                               "fp32_matmuls": len(on_grid["fp32_matmuls"])}}  # fmt: skip
    if weights == "w8a8":
        record |= {"activations": "int8 dynamic, per tensor", "dynamic_matmuls": kinds.count("MatMulInteger"),
                   "blockwise_matmuls": len(outliers), "smoothquant": blockwise is not None}  # fmt: skip
    return record


def down_projections(model: Any, modules: list[str] | None = None) -> list[str]:
    """The MatMuls whose constant weight's input width is not the model width (most MatMuls read the
    hidden state): the MLP down projections; with ``modules``, only those traced from these modules (by
    the exporter's name scopes, e.g. ``decoder.layers.11.mlp.down_proj`` for ``layers.11.mlp.down_proj``)."""
    from collections import Counter

    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    const = [(n.name, shapes[n.input[1]]) for n in model.graph.node
             if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2]  # fmt: skip
    if not const:
        return []
    width = Counter(shape[0] for _, shape in const).most_common(1)[0][0]
    downs = [name for name, shape in const if shape[0] != width]
    if modules is None or not downs:
        return downs
    scopes = {n.name: _name_scopes(n) for n in model.graph.node if n.name in downs}
    chosen = [d for d in downs if any(s == m or s.endswith(f".{m}") for s in scopes[d] for m in modules)]
    if len(chosen) != len(modules):
        raise InternalError(f"found {len(chosen)} of the down projections {modules} in graph {model.graph.name}")
    return chosen


def _name_scopes(node: Any) -> list[str]:
    """The module paths the exporter recorded for ``node`` (``pkg.torch.onnx.name_scopes``)."""
    import ast

    raw = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]")
    return [str(s) for s in ast.literal_eval(raw)]


def _dynamic(model: Any, exclude: list[str]) -> Any:
    """ONNX Runtime's dynamic quantization of every constant-weight MatMul not in ``exclude``."""
    import tempfile

    import onnx

    _, _ = _import_quantizer()  # restores the root logger the quantization package configures
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="vtprune-quant-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        _quiet(lambda: quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                                        op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude,
                                        extra_options={"MatMulConstBOnly": True,  # the fused decoder's
                                                       # contrib-op outputs have no inferred type
                                                       "DefaultTensorType": onnx.TensorProto.FLOAT}))  # fmt: skip
        return onnx.load(str(dst))


def _configs(weights: str) -> list[Any]:
    """The quantizer passes for ``weights``: MatMuls, then (int4) the embedding Gather."""
    default, _ = _import_quantizer()
    block, bits = BLOCK_SIZE[weights], WEIGHT_FORMATS[weights]
    if weights in TRT_WEIGHTS:  # blocked DequantizeLinear + MatMul; the embedding table stays fp32
        from onnxruntime.quantization import QuantFormat

        return [default(block_size=block, is_symmetric=True, accuracy_level=None, bits=bits,
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",),
                        quant_axes=(("MatMul", 0),))]  # fmt: skip
    ops = ("MatMul", "Gather") if weights == "int4" else ("MatMul",)
    return [default(block_size=block, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=bits,
                    op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))]  # fmt: skip


def _run_quantizer(model: Any, config: Any, exclude: list[str]) -> Any:
    _, quantizer_class = _import_quantizer()
    quantizer = quantizer_class(model, nodes_to_exclude=exclude, algo_config=config)
    _quiet(quantizer.process)
    return quantizer.model.model


def _import_quantizer() -> tuple[Any, Any]:
    """ONNX Runtime's quantizer classes (round-to-nearest config, quantizer); importing the module configures
    the root logger at INFO, which would print every later library log line, so it is restored."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as q
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return q.DefaultWeightOnlyQuantConfig, q.MatMulNBitsQuantizer


def _quiet(fn: Any) -> None:
    """The quantizer logs every node at INFO, and warns that int4 tables need opset 21 when it raises the
    graph's opset to 21 for them (ONNX Runtime loads the result; validation runs it); keep the export's
    own progress readable. All-zero weight blocks divide 0 by a 0 scale before being masked to 0."""
    import logging

    import numpy as np

    loggers = [logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer"), logging.getLogger()]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger to pre-process first
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            fn()
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# --- the vision graph: int8 with static activation scales calibrated on images ---------------------------
# int8: uint8 activations, ONNX Runtime's fast x86 form; int8-trt: symmetric int8 activations (zero points 0),
# the Q/DQ form TensorRT builds (ONNX Runtime runs it too, 1.4x slower on the pocket VLM's encoder).
VISION_FORMATS = ("int8", "int8-trt")
# Only the model's own layers are quantized: the exporter tags each node with the aten op it came from, and
# nn.Linear / nn.Conv2d weights arrive as aten.linear / aten.conv2d. Attention products (aten.matmul on two
# activations) and everything in the pruning stage (custom ops, and pooling's constant aten.matmul) stay fp32.
VISION_LAYER_OPS = ("aten.linear", "aten.conv2d")


def check_vision(vision: str | None, dtype: str, calib_n: int) -> None:
    _check_format("--vision", vision, VISION_FORMATS, dtype)
    if vision is not None and not 1 <= calib_n <= 4096:
        raise ConfigError(f"--calib-n {calib_n}: calibrate on 1 to 4096 images")


def vision_layer_nodes(model: Any) -> list[str]:
    """The MatMul / Gemm / Conv nodes of the vision graph that are model layers (``VISION_LAYER_OPS``)."""
    out = []
    for node in model.graph.node:
        scope = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        if node.op_type in ("MatMul", "Gemm", "Conv") and any(op in scope for op in VISION_LAYER_OPS):
            out.append(node.name)
    return out


def quantize_vision(
    path: Path, feeds: Iterable[dict[str, np.ndarray]], source: str, fmt: str = "int8"
) -> dict[str, Any]:
    """Rewrite the vision graph ``path`` in place as int8 QDQ: per-channel symmetric int8 weights and uint8
    activations with static scales (min-max over ``feeds``, the graph's inputs for the calibration images:
    STYLE.md's data-loader contract) on every model layer; returns what the manifest records.

    ONNX Runtime's ``quantize_static`` does the work. ``fmt`` int8: uint8 activations, ONNX Runtime's fast
    x86 path (u8s8; symmetric int8 activations ran 1.4x slower on the pocket VLM's encoder), which TensorRT
    does not take; int8-trt: symmetric int8 activations, TensorRT's explicit quantization (``vtprune
    build`` builds it)."""
    import tempfile

    import onnx

    from vtprune.export.onnx_io import save_atomic

    _, _ = _import_quantizer()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    layers = vision_layer_nodes(onnx.load(str(path), load_external_data=False))
    batches, symmetric = list(feeds), fmt == "int8-trt"

    with tempfile.TemporaryDirectory(prefix="vtprune-quant-", dir=path.parent) as tmp:
        dst = Path(tmp) / "vision.int8.onnx"
        _quiet(lambda: quantize_static(
            str(path), str(dst), calibration_reader(batches), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"], nodes_to_quantize=layers, per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": symmetric,
                           "QuantizeBias": not symmetric}))  # fmt: skip; TensorRT dequantizes no int32 bias
        save_atomic(onnx.load(str(dst)), path)
    kinds = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return {"vision": fmt, "method": "onnxruntime quantize_static, QDQ, min-max calibration",
            "weights": "int8 per channel, symmetric",
            "activations": f"{'int8' if symmetric else 'uint8'} per tensor, static scales"
                           + (", symmetric (TensorRT Q/DQ)" if symmetric else ""),
            "calibration": {"source": source, "images": len(batches)}, "quantized_nodes": len(layers),
            "qdq_pairs": kinds.count("QuantizeLinear"),
            "fp32": "attention products, layer norms, softmax and the pruning stage"}  # fmt: skip


# --- TensorRT's calibrated language model (int8-trt) -------------------------------------------------------
def quantize_static_lm(
    path: Path, feeds: Iterable[dict[str, np.ndarray]], weights: str, source: str
) -> dict[str, Any]:
    """Rewrite the traced decoder ``path`` in place as ``weights`` (int8-trt) Q/DQ: every constant-weight
    MatMul but the down projections, activation scales calibrated on ``feeds`` (the decoder's prefill
    inputs, ``export.smooth.prefill_feeds``); returns what the manifest records."""
    import tempfile

    import onnx

    from vtprune.export.onnx_io import save_atomic

    _, _ = _import_quantizer()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(path))
    consts = {i.name for i in model.graph.initializer}
    exclude = down_projections(model)
    layers = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in consts
              and n.name not in exclude]  # fmt: skip
    batches = [graph_feeds(model, f) for f in feeds]
    if not batches:
        raise InternalError("quantize_static_lm: no calibration feeds")

    with tempfile.TemporaryDirectory(prefix="vtprune-quant-", dir=path.parent) as tmp:
        dst = Path(tmp) / "decoder.q.onnx"
        _quiet(lambda: quantize_static(
            str(path), str(dst), calibration_reader(batches), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"], nodes_to_quantize=layers, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": True, "CalibStridedMinMax": 1}))
        save_atomic(onnx.load(str(dst)), path)
    kinds = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return {"weights": weights, "form": "qdq",
            "method": "onnxruntime quantize_static, QDQ, min-max calibration, after SmoothQuant",
            "weight_format": "int8 per output channel, symmetric", "activations": "int8 per tensor, static, symmetric",
            "calibration": {"source": source, "prompts": len(batches)}, "quantized_nodes": len(layers),
            "qdq_pairs": kinds.count("QuantizeLinear"), "fp32_matmuls": sorted(exclude)}  # fmt: skip


def graph_feeds(model: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feed`` (a prefill's ``inputs_embeds`` and ``position_ids``) completed to every input of the decoder
    graph ``model``: an all-ones attention mask over the prompt and empty past caches."""
    import onnx

    from vtprune.export.decoder import PAST

    out, n = dict(feed), feed["inputs_embeds"].shape[1]
    for inp in model.graph.input:
        if inp.name in out:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (0 if d.dim_param == PAST else n)
                for d in inp.type.tensor_type.shape.dim]  # fmt: skip
        dims[0] = 1  # the batch
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if inp.name == "attention_mask":
            out[inp.name] = np.ones(dims, dtype)
        elif PAST in [d.dim_param for d in inp.type.tensor_type.shape.dim]:
            out[inp.name] = np.zeros(dims, dtype)
        else:
            raise InternalError(f"graph_feeds: no calibration value for decoder input {inp.name!r}")
    return out


def calibration_reader(batches: list[dict[str, np.ndarray]]) -> Any:
    """``batches`` (graph feeds) as ONNX Runtime's calibration data reader, ranged for strided calibration
    (``CalibStridedMinMax``)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.set_range(0, len(batches))

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(batches[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return Reader()
