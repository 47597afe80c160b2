"""Weight-only quantization of a bundle's language-model graphs, with ONNX Runtime's own tool.

``--weights int4|int8`` rewrites every MatMul of the embed, decoder, prefill and decode graphs whose weight
is a constant into ONNX Runtime's ``MatMulNBits`` (blocks of ``BLOCK_SIZE`` along the input dimension), the
format ORT-GenAI's model builder writes, through ``onnxruntime.quantization.matmul_nbits_quantizer``:

- int8: round-to-nearest, symmetric, one fp32 scale per block;
- int4: HQQ (half-quadratic optimisation of each block's scale and zero point, data-free), because plain
  round-to-nearest int4 moved the pocket VLM's next-token distribution by up to 2 nats (KL) and HQQ by
  0.004 on the same prompts; the embedding table's ``Gather`` becomes ``GatherBlockQuantized`` (int4,
  round-to-nearest: only the text tokens' embeddings, which feed the same decoder).

Activations stay fp32; every ``MatMulNBits`` gets ``accuracy_level`` 4, so the CPU kernels quantize the
activations to int8 per block and use int8 dot products (VNNI/AMX), the fastest CPU path; the KL above was
measured with it.

What stays fp32 (the manifest lists these islands): the vision graph with its pruning stage, and every
in-LLM selector (ALVTS's low-rank factors, the initializers named ``alvts_*``), so token choices are made
in full precision. Quantized bundles run in ONNX Runtime (CPU, CUDA); TensorRT builds need the Q/DQ form,
so ``vtprune build`` refuses these graphs with one line.
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
    """Rewrite ``path`` in place with ``weights`` (int4 / int8) MatMul (and int4 Gather) weights; returns what
    the manifest records (format, method, block size, quantized node count, the MatMuls kept in fp32)."""
    import onnx

    from vtprune.export.onnx_io import save_atomic

    model = onnx.load(str(path))
    consts = {i.name for i in model.graph.initializer}
    selector = {name for name in consts if name.startswith(FP32_WEIGHT_PREFIXES)}
    islands = [n.name for n in model.graph.node if n.op_type == "MatMul" and selector & set(n.input)]
    for config in _configs(weights):
        model = _run_quantizer(model, config, islands)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", ACCURACY_LEVEL))
    kinds = [n.op_type for n in model.graph.node]
    save_atomic(model, path)
    return {"weights": weights, "method": "hqq" if weights == "int4" else "rtn", "block_size": BLOCK_SIZE,
            "accuracy_level": ACCURACY_LEVEL,
            "quantized_nodes": kinds.count("MatMulNBits") + kinds.count("GatherBlockQuantized"),
            "fp32_matmuls": islands}  # fmt: skip


def _configs(weights: str) -> list[Any]:
    """The quantizer passes for ``weights``: MatMuls, then (int4) the embedding Gather."""
    default, _, hqq = _import_quantizer()
    if weights == "int8":
        return [default(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=8,
                        op_types_to_quantize=("MatMul",))]  # fmt: skip
    return [hqq(block_size=BLOCK_SIZE, bits=4, op_types_to_quantize=("MatMul",)),
            default(block_size=BLOCK_SIZE, is_symmetric=True, bits=4, op_types_to_quantize=("Gather",),
                    quant_axes=(("Gather", 1),))]  # fmt: skip


def _run_quantizer(model: Any, config: Any, exclude: list[str]) -> Any:
    _, quantizer_class, _ = _import_quantizer()
    quantizer = quantizer_class(model, nodes_to_exclude=exclude, algo_config=config)
    _quiet(quantizer.process)
    return quantizer.model.model


def _import_quantizer() -> tuple[Any, Any, Any]:
    """ONNX Runtime's quantizer classes (default RTN config, quantizer, HQQ config); importing the module
    configures the root logger at INFO, which would print every later library log line, so it is restored."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as q
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return q.DefaultWeightOnlyQuantConfig, q.MatMulNBitsQuantizer, q.HQQWeightOnlyQuantConfig


def _quiet(fn: Any) -> None:
    """The quantizer logs every node at INFO, and warns that int4 tables need opset 21 when it raises the
    graph's opset to 21 for them (ONNX Runtime loads the result; validation runs it); keep the export's
    own progress readable. All-zero weight blocks divide 0 by a 0 scale before being masked to 0, and HQQ
    wraps read-only arrays in torch tensors; both warn harmlessly."""
    import logging
    import warnings

    import numpy as np

    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, logger.level = logger.level, logging.ERROR
    try:
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            fn()
    finally:
        logger.setLevel(level)
