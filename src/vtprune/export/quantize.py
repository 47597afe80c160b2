"""Weight-only quantization of a bundle's language-model graphs, with ONNX Runtime's own tool.

``--weights int4|int8`` rewrites every MatMul of the embed, decoder, prefill and decode graphs whose weight
is a constant into ONNX Runtime's ``MatMulNBits`` (blocks of ``BLOCK_SIZE`` along the input dimension,
symmetric, one fp32 scale per block) and the embedding table's ``Gather`` into ``GatherBlockQuantized``,
through ``onnxruntime.quantization.matmul_nbits_quantizer`` (the format ORT-GenAI's model builder writes).
Activations stay fp32; ``accuracy_level`` 4 lets the CPU kernels quantize them to int8 per block on the
fly (VNNI/AMX dot products), the fastest CPU path.

What stays fp32 (the manifest lists these islands): the vision graph with its pruning stage, and every
in-LLM selector (ALVTS's low-rank factors, the initializers named ``alvts_*``), so token choices are made
in full precision. Quantized bundles run in ONNX Runtime (CPU, CUDA); TensorRT builds need the Q/DQ form,
which ``vtprune build`` asks for by refusing these graphs with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vtprune.errors import ConfigError

WEIGHT_FORMATS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits on the CPU (ORT's fastest x86 path)
QUANTIZED_GRAPHS = ("embed", "decoder", "prefill", "decode")
FP32_WEIGHT_PREFIXES = ("alvts_",)  # in-LLM selector factors: token choices stay fp32


def check_weights(weights: str | None, dtype: str) -> None:
    if weights is None:
        return
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"--weights {weights}: choose one of {', '.join(WEIGHT_FORMATS)}")
    if dtype != "fp32":
        raise ConfigError(f"--weights {weights} quantizes fp32 graphs; drop --dtype {dtype}")


def quantize_graph(path: Path, weights: str) -> dict[str, Any]:
    """Rewrite ``path`` in place with ``weights`` (int4 / int8) MatMul and Gather weights; returns what the
    manifest records (format, block size, quantized node count, the MatMuls kept in fp32)."""
    import onnx

    from vtprune.export.onnx_io import save_atomic

    DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer = _import_quantizer()

    model = onnx.load(str(path))
    consts = {i.name for i in model.graph.initializer}
    selector = {name for name in consts if name.startswith(FP32_WEIGHT_PREFIXES)}
    islands = [n.name for n in model.graph.node if n.op_type == "MatMul" and selector & set(n.input)]
    config = DefaultWeightOnlyQuantConfig(
        block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=WEIGHT_FORMATS[weights],
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)),
    )  # fmt: skip
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=islands, algo_config=config)
    _quiet(quantizer.process)
    out = quantizer.model.model
    kinds = [n.op_type for n in out.graph.node]
    save_atomic(out, path)
    return {"weights": weights, "block_size": BLOCK_SIZE, "accuracy_level": ACCURACY_LEVEL,
            "quantized_nodes": kinds.count("MatMulNBits") + kinds.count("GatherBlockQuantized"),
            "fp32_matmuls": islands}  # fmt: skip


def _import_quantizer() -> tuple[Any, Any]:
    """ONNX Runtime's quantizer classes; importing the module configures the root logger at INFO, which would
    print every later library log line, so the root logger is restored."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer


def _quiet(fn: Any) -> None:
    """The quantizer logs every node at INFO, and warns that int4 tables need opset 21 when it raises the
    graph's opset to 21 for them (ONNX Runtime loads the result; validation runs it); keep the export's
    own progress readable. All-zero weight blocks divide 0 by a 0 scale before being masked to 0."""
    import logging

    import numpy as np

    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, logger.level = logger.level, logging.ERROR
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            fn()
    finally:
        logger.setLevel(level)
