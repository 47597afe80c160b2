"""What a bundle's graphs cost, read from the graphs themselves (no session, no weights loaded).

The vision graph (static shapes, batch 1) is inlined (G-Prune's function bodies become plain ops) and
shape-inferred; every MatMul/Gemm/Conv contributes its FLOPs, every weight is read once, and every
non-view op reads its activation inputs and writes its outputs (an unfused upper bound). Decoder and
embedding graphs only contribute parameter and op counts; their work is analytic (``roofline``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VIEW_OPS = {"Constant", "Shape", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Size",
            "ConstantOfShape", "Range"}  # fmt: skip
GEMM_OPS = {"MatMul", "Gemm", "Conv", "FusedMatMul", "Attention", "MultiHeadAttention"}


@dataclass(frozen=True)
class GraphCost:
    """FLOPs, weights read, activation traffic and op counts of one graph run."""

    flops: float
    weight_params: int
    activation_elems: float
    ops_all: int
    ops_gemm: int
    unresolved: int  # compute ops whose shapes shape inference could not resolve (not counted)

    def ops(self, which: str) -> int:
        return self.ops_gemm if which == "gemm" else self.ops_all


def load_inlined(path: Path, batch: int = 1) -> Any:
    """The graph with local functions inlined, dynamic batch set to ``batch``, shapes inferred."""
    import onnx
    import onnx.inliner

    model = onnx.inliner.inline_local_functions(onnx.load(str(path), load_external_data=False))
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def _shapes(model: Any) -> dict[str, list[int | None]]:
    out = {}
    for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    return out


def _numel(shape: list[int | None] | None) -> int | None:
    return None if shape is None or any(d is None for d in shape) else math.prod(shape)


def node_flops(node: Any, ins: list[list[int | None] | None], out: list[int | None] | None) -> float | None:
    """FLOPs (2 per MAC) of a MatMul/Gemm/Conv from its input and output shapes; None if unknown."""
    y = _numel(out)
    if y is None or not ins or ins[0] is None:
        return None
    if node.op_type in ("MatMul", "FusedMatMul"):
        k = ins[0][-1]
    elif node.op_type == "Gemm":
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        k = ins[0][0] if trans_a else ins[0][1]
    elif node.op_type == "Conv" and len(ins) > 1 and _numel(ins[1]) is not None:
        k = math.prod(ins[1][1:])  # per output element: C_in/groups x kernel MACs
    else:
        return None
    return None if k is None else 2.0 * y * k


def graph_cost(path: Path) -> GraphCost:
    """Cost of one run of the ONNX graph at ``path`` (batch 1)."""
    model = load_inlined(path)
    shapes = _shapes(model)
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    flops, acts, ops_all, ops_gemm, unresolved, weights = 0.0, 0.0, 0, 0, 0, set()
    for node in model.graph.node:
        if node.op_type in VIEW_OPS:
            continue
        ops_all += 1
        ins = [inits.get(n) or shapes.get(n) for n in node.input if n]
        if node.op_type in GEMM_OPS:
            ops_gemm += 1
            f = node_flops(node, ins, shapes.get(node.output[0]))
            unresolved += f is None
            flops += f or 0.0
        weights.update(n for n in node.input if n in inits)
        acts += sum(_numel(shapes.get(n)) or 0 for n in [*node.input, *node.output] if n and n not in inits)
    params = sum(math.prod(inits[n]) for n in weights)
    return GraphCost(flops, params, acts, ops_all, ops_gemm, unresolved)


def param_count(path: Path) -> int:
    """Elements of every initializer (the weights one run reads), without loading external data."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(math.prod(i.dims) for i in model.graph.initializer)


def op_counts(path: Path) -> tuple[int, int]:
    """(non-view ops, GEMM-like ops) of the inlined graph."""
    import onnx
    import onnx.inliner

    model = onnx.inliner.inline_local_functions(onnx.load(str(path), load_external_data=False))
    kinds = [n.op_type for n in model.graph.node if n.op_type not in VIEW_OPS]
    return len(kinds), sum(k in GEMM_OPS for k in kinds)


def ort_op_count(path: Path, threads: int | None = None) -> int | None:
    """Non-view ops ONNX Runtime's CPU provider executes after its graph optimisations (None on failure)."""
    import tempfile

    import onnx

    from vtprune.backends.ort import import_ort

    ort = import_ort()
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        if threads:
            opts.intra_op_num_threads = threads
        try:
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            model = onnx.load(opts.optimized_model_filepath, load_external_data=False)
        except Exception:  # an optional refinement: callers fall back to the inlined graph's count
            return None
    return sum(n.op_type not in VIEW_OPS for n in model.graph.node)
