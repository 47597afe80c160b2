"""ONNX face of the pruning ops: schemas, function bodies (standard ops only) and dynamo translations."""

from __future__ import annotations

from functools import cache

import onnx
from onnx import TensorProto, helper
from onnx.defs import OpSchema

from vtprune.export.ops import DOMAIN, DOMAIN_VERSION


@cache
def register_schemas() -> None:
    """Register ``vtprune::GraphPropagate`` and ``vtprune::TopKRoute`` with onnx.defs (once per process)."""
    fp = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    float_types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    onnx.defs.register_schema(OpSchema(
        "GraphPropagate", DOMAIN, DOMAIN_VERSION,
        doc="G-Prune scores: cosine graph (edges >= theta), softmax(S/tau) transitions, T steps from L2 "
            "norms, divided by degree. Invalid tokens score -inf.",
        inputs=[fp("x", "T", "tokens [B, N, D]"), fp("valid", "tensor(bool)", "real tokens [B, N]")],
        outputs=[fp("scores", "tensor(float)", "scores [B, N]")],
        type_constraints=[("T", float_types, "token dtype")],
        attributes=[attr("theta", OpSchema.AttrType.FLOAT, "edge threshold"),
                    attr("tau", OpSchema.AttrType.FLOAT, "temperature"),
                    attr("iters", OpSchema.AttrType.INT, "propagation steps")],
    ))  # fmt: skip
    onnx.defs.register_schema(OpSchema(
        "TopKRoute", DOMAIN, DOMAIN_VERSION,
        doc="Keep the k highest-scoring tokens: indices sorted ascending, tokens gathered in that order.",
        inputs=[fp("x", "T", "tokens [B, N, D]"), fp("scores", "tensor(float)", "scores [B, N]")],
        outputs=[fp("tokens", "T", "kept tokens [B, k, D]"), fp("indices", "tensor(int64)", "kept indices [B, k]")],
        type_constraints=[("T", float_types, "token dtype")],
        attributes=[attr("k", OpSchema.AttrType.INT, "tokens kept")],
    ))  # fmt: skip


def _const(name: str, value: float | int | list[int], dtype: int = TensorProto.FLOAT) -> onnx.NodeProto:
    vals = value if isinstance(value, list) else [value]
    dims = [len(vals)] if isinstance(value, list) else []
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, vals))


def similarity_blocks(n: int | None, opset: int) -> int:
    """Row blocks for the cosine Gram of ``n`` tokens: 1 below 512 tokens or when ``n`` is unknown.

    Above, blocks of about 192 rows (at most 8): the Gram is symmetric, so only the b(b+1)/2 upper
    blocks are multiplied (the rest are their transposes). On a 2-core Xeon this cuts ONNX Runtime's
    Gram for N = 576, D = 4096 from about 11 to 7.4 ms and for N = 2304 from about 150 to 90 ms,
    bit-identical to the single MatMul there. Split's ``num_outputs`` needs opset 18.
    """
    if n is None or n < 512 or opset < 18:
        return 1
    return min(8, -(-n // 192))


def _gram(u: str, out: str, blocks: int) -> list[onnx.NodeProto]:
    """Nodes for ``out = u @ u^T`` over the last two axes, as one MatMul or by symmetric row blocks."""
    n = helper.make_node
    if blocks == 1:
        return [n("Transpose", [u], ["ut"], perm=[0, 2, 1]), n("MatMul", [u, "ut"], [out])]
    rows = [f"u{i}" for i in range(blocks)]
    nodes = [n("Split", [u], rows, axis=1, num_outputs=blocks)]
    nodes += [n("Transpose", [r], [f"{r}t"], perm=[0, 2, 1]) for r in rows]
    for i in range(blocks):
        for j in range(i, blocks):
            nodes.append(n("MatMul", [rows[i], f"{rows[j]}t"], [f"g{i}_{j}"]))
            if j > i:
                nodes.append(n("Transpose", [f"g{i}_{j}"], [f"g{j}_{i}"], perm=[0, 2, 1]))
    nodes += [n("Concat", [f"g{i}_{j}" for j in range(blocks)], [f"grow{i}"], axis=2) for i in range(blocks)]
    return [*nodes, n("Concat", [f"grow{i}" for i in range(blocks)], [out], axis=1)]


def graph_propagate_function(theta: float, tau: float, iters: int, opset: int, blocks: int = 1) -> onnx.FunctionProto:
    """Function body of GraphPropagate with theta, tau and T baked in (T unrolled, no Loop).

    ``blocks`` > 1 computes the cosine Gram by symmetric row blocks (see ``similarity_blocks``).
    """
    n = helper.make_node
    nodes = [
        _const("axes_last", [-1], TensorProto.INT64), _const("axes_m2", [-2], TensorProto.INT64),
        _const("one_ax", [1], TensorProto.INT64), _const("theta", theta), _const("inv_tau", 1.0 / tau),
        _const("tiny", 1.1754943508222875e-38),
        _const("zero_i", 0, TensorProto.INT64), _const("one_i", 1, TensorProto.INT64),
        n("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        n("ReduceL2", ["xf", "axes_last"], ["norm_k"], keepdims=1),                 # [B, N, 1]
        n("Max", ["norm_k", "tiny"], ["norm_safe"]),
        n("Div", ["xf", "norm_safe"], ["u"]),                                        # unit rows
        *_gram("u", "sim", blocks),                                                  # [B, N, N] cosines
        n("Shape", ["x"], ["shape"]), n("Gather", ["shape", "one_i"], ["n"], axis=0),
        n("Range", ["zero_i", "n", "one_i"], ["ar"]),
        n("Unsqueeze", ["ar", "one_ax"], ["ar_col"]), n("Unsqueeze", ["ar", "zero_ax"], ["ar_row"]),
        n("Equal", ["ar_col", "ar_row"], ["eye"]),                                   # [N, N] self-loops
        n("GreaterOrEqual", ["sim", "theta"], ["edge"]),
        n("Unsqueeze", ["valid", "axes_last"], ["v_col"]), n("Unsqueeze", ["valid", "axes_m2"], ["v_row"]),
        n("And", ["v_col", "v_row"], ["pair"]),
        n("And", ["edge", "pair"], ["edge_valid"]),
        n("Or", ["edge_valid", "eye"], ["mask"]),                                    # self-loops, pads too
        n("Mul", ["sim", "inv_tau"], ["logits"]),
        # Row softmax over the edges, spelled out: a Softmax over logits masked to a large negative
        # value is 14x slower in ONNX Runtime's CPU kernel (its exp of underflowing inputs), while
        # softmax is shift-invariant and the self-loop (logit 1/tau, the row's largest) keeps the sum
        # >= ~1. Masked entries become exact zeros, as exp(-1e4 - max) does in the reference.
        n("ReduceMax", ["logits", "axes_last"], ["row_max"], keepdims=1),
        n("Sub", ["logits", "row_max"], ["shifted"]),
        n("Exp", ["shifted"], ["e_all"]),
        n("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
        n("Mul", ["e_all", "mask_f"], ["e"]),                                        # exact 0 off-graph
        n("ReduceSum", ["e", "axes_last"], ["e_sum"], keepdims=1),
        n("Div", ["e", "e_sum"], ["P"]),                                             # row-stochastic
        # In-degree; the blocked Gram is exactly symmetric, so row sums (contiguous, 10x faster) agree.
        n("ReduceSum", ["mask_f", "axes_last" if blocks > 1 else "axes_m2"], ["deg"], keepdims=0),
        n("Cast", ["valid"], ["valid_f"], to=TensorProto.FLOAT),
        n("Squeeze", ["norm_k", "axes_last"], ["norm"]),                             # [B, N]
        n("Mul", ["norm", "valid_f"], ["s0"]),
    ]  # fmt: skip
    nodes.insert(0, _const("zero_ax", [0], TensorProto.INT64))
    s = "s0"
    for t in range(iters):  # s <- s P, unrolled
        nodes += [n("Unsqueeze", [s, "one_ax"], [f"s{t}_row"]), n("MatMul", [f"s{t}_row", "P"], [f"s{t}_mm"]),
                  n("Squeeze", [f"s{t}_mm", "one_ax"], [f"s{t + 1}p"])]  # fmt: skip
        s = f"s{t + 1}p"
    nodes += [
        n("Div", [s, "deg"], ["score"]), _const("neg_inf", float("-inf")),
        n("Where", ["valid", "score", "neg_inf"], ["scores"]),
    ]
    return helper.make_function(
        DOMAIN, "GraphPropagate", ["x", "valid"], ["scores"], nodes,
        [helper.make_opsetid("", opset)], attributes=["theta", "tau", "iters"],
        doc_string=f"G-Prune body, baked theta={theta} tau={tau} iters={iters} gram_blocks={blocks}",
    )  # fmt: skip


def topk_route_function(opset: int) -> onnx.FunctionProto:
    """Function body of TopKRoute: TopK(k) by score, TopK ascending on the indices, GatherND of rows."""
    n = helper.make_node
    k_attr = helper.make_attribute_ref("value_int", onnx.AttributeProto.INT)
    k_attr.ref_attr_name = "k"
    nodes = [
        helper.make_node("Constant", [], ["k_scalar"]), _const("zero_ax", [0], TensorProto.INT64),
        _const("last_ax", [-1], TensorProto.INT64),
        n("Unsqueeze", ["k_scalar", "zero_ax"], ["K"]),                              # [1] int64
        n("TopK", ["scores", "K"], ["top_vals", "top_idx"], axis=-1, largest=1, sorted=1),
        n("Cast", ["top_idx"], ["idx_f"], to=TensorProto.FLOAT),                     # exact below 2^24
        n("TopK", ["idx_f", "K"], ["idx_sorted_f", "order"], axis=-1, largest=0, sorted=1),
        n("Cast", ["idx_sorted_f"], ["indices"], to=TensorProto.INT64),              # ascending
        n("Unsqueeze", ["indices", "last_ax"], ["idx3"]),                            # [B, k, 1]
        n("GatherND", ["x", "idx3"], ["tokens"], batch_dims=1),                      # [B, k, D] rows
    ]  # fmt: skip
    nodes[0].attribute.append(k_attr)
    return helper.make_function(
        DOMAIN, "TopKRoute", ["x", "scores"], ["tokens", "indices"], nodes,
        [helper.make_opsetid("", opset)], attributes=["k"],
    )  # fmt: skip


def translations() -> dict:
    """custom_translation_table for torch.onnx.export(dynamo=True): torch ops -> vtprune nodes."""
    import onnxscript
    import torch

    register_schemas()
    vtp = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def graph_propagate(x, valid, theta: float, tau: float, iters: int):
        return vtp.GraphPropagate(x, valid, theta=theta, tau=tau, iters=iters)

    def topk_route(x, scores, k: int):
        return vtp.TopKRoute(x, scores, k=k)

    ops = torch.ops.vtprune
    return {ops.graph_propagate.default: graph_propagate, ops.topk_route.default: topk_route}


def _token_count(model: onnx.ModelProto, name: str) -> int | None:
    """Static N (axis 1) of tensor ``name`` from the graph's inputs and value_info, or None."""
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            return dims[1].dim_value if len(dims) == 3 and dims[1].HasField("dim_value") else None
    return None


def attach_functions(model: onnx.ModelProto, blocks: int | None = None) -> onnx.ModelProto:
    """Add function bodies for every vtprune node in ``model`` (checks GraphPropagate configs agree).

    ``blocks``: row blocks of the cosine Gram; by default from the smallest static token count of the
    GraphPropagate inputs (``similarity_blocks``), 1 when any is dynamic.
    """
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    gp = [nd for nd in model.graph.node if nd.domain == DOMAIN and nd.op_type == "GraphPropagate"]
    configs = {tuple(helper.get_attribute_value(a) for a in sorted(nd.attribute, key=lambda a: a.name)) for nd in gp}
    if len(configs) > 1:
        raise ValueError(f"GraphPropagate nodes disagree on (iters, tau, theta): {sorted(configs)}")
    del model.functions[:]
    if gp:
        iters, tau, theta = next(iter(configs))
        if blocks is None:
            counts = [_token_count(model, nd.input[0]) for nd in gp]
            blocks = similarity_blocks(None if None in counts else min(counts), opset)
        model.functions.append(graph_propagate_function(theta, tau, iters, opset, blocks))
    if any(nd.domain == DOMAIN and nd.op_type == "TopKRoute" for nd in model.graph.node):
        model.functions.append(topk_route_function(opset))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model
