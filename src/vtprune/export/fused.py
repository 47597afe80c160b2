"""The language decoder written directly as ONNX Runtime's fused CPU operators (the layout ORT-GenAI's
model builder writes), for bundles that run only in ONNX Runtime.

The traced decoder (``export.decoder``) is portable ONNX: TensorRT builds it, and it validates against
PyTorch. In ONNX Runtime its ~1900 small nodes cost more than the weights at low precision: an int4 decode
step of the pocket VLM spent 8.8 of 23.7 ms in its ``MatMulNBits`` and the rest in ``Concat``, ``Expand``
(the grouped-query KV repeat, which copies the whole cache every step), ``Mul``, ``Reshape`` and friends
(ONNX Runtime profile, 2-core Xeon). This graph has the same inputs, outputs and meaning with ~14 nodes per
layer:

    SkipSimplifiedLayerNormalization (residual add + RMSNorm)
    MatMul q|k|v (one packed weight) -> Split -> RotaryEmbedding q, k (position ids as given: gaps kept)
    GroupQueryAttention (causal, past + new keys, no KV repeat) -> MatMul o
    SkipSimplifiedLayerNormalization -> MatMul gate|up (one packed weight) -> Split -> SiLU(gate) * up
    -> MatMul down

and the LM head on the last position only. In-LLM bundles (ALVTS, FastV...) get the same graph as their
one-token ``decode`` graph (``export_fused_decode``): each layer's cache has its own length there (routed
layers keep fewer visual rows), given by the ``cache_lengths`` input instead of an attention mask; their
routed prefill graph stays traced. Weights are read from the loaded PyTorch modules (after SmoothQuant,
when the bundle is ``w8a8``); ``quantize_graph`` then rewrites its MatMuls like the traced graph's. The rotary
tables are computed by the model's own rotary module for every position up to
``max_position_embeddings``, so any position-only RoPE scaling carries over.

Supported: Llama-family decoders (Llama, Mistral, Qwen2; q/k/v biases allowed) with SiLU MLPs, 1-D
position ids and full rotary. Anything else (M-RoPE, other activations, sliding windows) is refused by
``fused_support`` with the reason, and the bundle keeps the traced decoder. The attention mask must be all
ones (unpadded sequences), which is what vtprune's runtime passes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtprune.errors import ExportError
from vtprune.export.decoder import BATCH, PAST, SEQUENCE, TOTAL, decoder_names, io_spec, require_model
from vtprune.export.layerwise import PAST_OF, decode_names
from vtprune.models.base import VlmAdapter

MS = "com.microsoft"
FAMILIES = ("llama", "mistral", "qwen2")


def fused_support(adapter: VlmAdapter) -> str | None:
    """None when ``adapter``'s decoder can be written as the fused graph, else why not (one phrase)."""
    cfg = adapter.text_config
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if "mrope_section" in rope:
        return "it uses M-RoPE (3-D position ids)"
    model_type = getattr(cfg, "model_type", "")
    if model_type not in FAMILIES:
        return f"its text model type {model_type!r} is not one of {', '.join(FAMILIES)}"
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        return "it rotates part of each head only"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"its MLP activation is {cfg.hidden_act!r}, not silu"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "it uses sliding-window attention"
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False) and model_type != "qwen2":
        return "its MLP or output projection has biases"
    return None


def export_fused_decoder(adapter: VlmAdapter, path: Path, opset: int = 18, graph: str = "decoder") -> dict[str, Any]:
    """Write the fused decoder of ``adapter`` to ``path`` (atomically) and return its IO description
    (``export.decoder.io_spec``, with ``"exporter": "fused"``): the traced graph's inputs and outputs.
    ``graph`` ``decode``: an in-LLM bundle's one-token decode graph (``build_fused_decoder(per_layer=True)``)."""
    from vtprune.export.onnx_io import EXTERNAL_ABOVE, save_graph, tensor_bytes

    require_model(adapter)
    reason = fused_support(adapter)
    if reason is not None:
        raise ExportError(f"the fused {graph} graph cannot be written for this model: {reason}")
    model = build_fused_decoder(adapter, opset, per_layer=graph == "decode")  # no onnx.checker: it does not
    # know ORT's default-domain SimplifiedLayerNormalization; the export validation runs the graph in ORT
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    files = save_graph(model, Path(path), external=tensor_bytes(model) > EXTERNAL_ABOVE)
    spec = io_spec(Path(path), graph, files, opset, adapter)
    spec["exporter"] = "fused"
    return spec


def export_fused_decode(adapter: VlmAdapter, path: Path, opset: int = 18) -> dict[str, Any]:
    """``export_fused_decoder`` for an in-LLM bundle's ``decode`` graph (each layer's cache its own length,
    ``cache_lengths``)."""
    return export_fused_decoder(adapter, path, opset, graph="decode")


def build_fused_decoder(adapter: VlmAdapter, opset: int = 18, per_layer: bool = False) -> Any:
    """The fused decoder of ``adapter`` as an ``onnx.ModelProto`` (weights inline). ``per_layer``: the
    in-LLM ``decode`` graph: layer l's past holds its own number of rows, ``cache_lengths[:, l]`` of which
    are valid (the rest: free rows of a preallocated buffer), and there is no attention mask."""
    from onnx import TensorProto, helper

    d = adapter.text_dims()
    g = _Graph(adapter.lm_head.weight.dtype)
    float_type = g.elem
    if per_layer:
        inputs, outputs = decode_names(d.layers)
        inputs = inputs[:2] + ["cache_lengths"] + inputs[2:]
        pasts = [PAST_OF.format(i=i // 2) for i in range(2 * d.layers)]
        totals = [f"total_sequence_length_{i // 2}" for i in range(2 * d.layers)]
        lengths = helper.make_tensor_value_info("cache_lengths", TensorProto.INT64, [BATCH, d.layers])
    else:
        inputs, outputs = decoder_names(d.layers)
        pasts, totals = [PAST] * (2 * d.layers), [TOTAL] * (2 * d.layers)
        lengths = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [BATCH, TOTAL])
    io_in = [
        helper.make_tensor_value_info("inputs_embeds", float_type, [BATCH, SEQUENCE, d.hidden]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [BATCH, SEQUENCE]), lengths,
    ] + [helper.make_tensor_value_info(n, float_type, [BATCH, d.kv_heads, p, d.head_dim])
         for n, p in zip(inputs[3:], pasts, strict=True)]  # fmt: skip
    io_out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, 1, d.vocab])]
    io_out += [helper.make_tensor_value_info(n, float_type, [BATCH, d.kv_heads, t, d.head_dim])
               for n, t in zip(outputs[1:], totals, strict=True)]  # fmt: skip

    # GroupQueryAttention's seqlens_k (B,) int32 = tokens seen - 1 and total_sequence_length () int32
    one = g.const("one_i64", np.array(1, np.int64))
    if per_layer:  # cache_lengths (B, layers) + new tokens, then one column per layer
        new = g.node("Squeeze", [g.node("Shape", ["inputs_embeds"], start=1, end=2),
                                 g.const("zero_axis", np.array([0], np.int64))])  # fmt: skip
        seen = g.node("Add", ["cache_lengths", new])
        all_seqlens = g.node("Cast", [g.node("Sub", [seen, one])], to=TensorProto.INT32)
        all_totals = g.node("Cast", [g.node("ReduceMax", [seen, g.const("zero_axis", None)], keepdims=0)],
                            to=TensorProto.INT32)  # fmt: skip

        def lengths_of(i: int) -> tuple[str, str]:
            index = g.const(f"layer_{i}", np.array(i, np.int64))
            return (g.node("Gather", [all_seqlens, index], axis=1), g.node("Gather", [all_totals, index], axis=0))
    else:
        total = g.node("ReduceSum", ["attention_mask", g.const("one_axis", np.array([1], np.int64))], keepdims=0)
        seqlens = g.node("Cast", [g.node("Sub", [total, one])], to=TensorProto.INT32)
        shape = g.node("Shape", ["attention_mask"], start=1, end=2)
        total_len = g.node("Cast", [g.node("Squeeze", [shape, g.const("zero_axis", np.array([0], np.int64))])],
                           to=TensorProto.INT32)  # fmt: skip

        def lengths_of(i: int) -> tuple[str, str]:
            return seqlens, total_len
    cos, sin = _rotary_tables(adapter, g)

    decoder = adapter.decoder
    h, residual = "inputs_embeds", None
    for i, layer in enumerate(decoder.layers):
        scope = f"decoder.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        x, residual = g.norm(h, residual, layer.input_layernorm, f"{scope}.input_layernorm")
        qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        qkv_b = None
        if attn.q_proj.bias is not None:
            qkv_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        qkv = g.linear(x, qkv_w, qkv_b, f"{scope}.self_attn.qkv_proj")
        sizes = [d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim]
        q, k, v = g.node("Split", [qkv, g.const("qkv_sizes", np.array(sizes, np.int64))], outputs=3, axis=-1)
        q = g.node("RotaryEmbedding", [q, "position_ids", cos, sin], domain=MS, num_heads=d.heads)
        k = g.node("RotaryEmbedding", [k, "position_ids", cos, sin], domain=MS, num_heads=d.kv_heads)
        past_k, past_v = inputs[3 + 2 * i], inputs[4 + 2 * i]
        present = [outputs[1 + 2 * i], outputs[2 + 2 * i]]
        a = g.node("GroupQueryAttention", [q, k, v, past_k, past_v, *lengths_of(i)], domain=MS,
                   named=[g.fresh("attn"), *present], num_heads=d.heads, kv_num_heads=d.kv_heads,
                   scale=float(getattr(attn, "scaling", 1.0 / math.sqrt(d.head_dim))))[0]  # fmt: skip
        o = g.linear(a, attn.o_proj.weight, attn.o_proj.bias, f"{scope}.self_attn.o_proj")
        x, residual = g.norm(o, residual, layer.post_attention_layernorm, f"{scope}.post_attention_layernorm")
        gate_up = g.linear(x, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), None, f"{scope}.mlp.gate_up_proj")
        gate, up = g.node("Split", [gate_up, g.const("gate_up_sizes", np.array([d.intermediate] * 2, np.int64))],
                          outputs=2, axis=-1)  # fmt: skip
        act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])]), up])
        h = g.linear(act, mlp.down_proj.weight, None, f"{scope}.mlp.down_proj")
    x, _ = g.norm(h, residual, decoder.norm, "decoder.norm")
    last = g.node("Slice", [x, g.const("minus_one", np.array([-1], np.int64)),
                            g.const("int_max", np.array([2**62], np.int64)),
                            g.const("one_axis", np.array([1], np.int64))])  # fmt: skip
    logits = g.linear(last, adapter.lm_head.weight, getattr(adapter.lm_head, "bias", None), "lm_head")
    if g.elem != TensorProto.FLOAT:
        logits = g.node("Cast", [logits], to=TensorProto.FLOAT)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))

    graph = helper.make_graph(g.nodes, "decode_fused" if per_layer else "decoder_fused", io_in, io_out, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                              producer_name="vtprune")  # fmt: skip
    model.ir_version = 10  # ONNX Runtime reads IR <= 10 for opset 18..21 graphs
    return model


def _rotary_tables(adapter: VlmAdapter, g: _Graph) -> tuple[str, str]:
    """cos / sin caches ``(max_positions, head_dim / 2)`` from the model's own rotary module."""
    cfg = adapter.text_config
    d = adapter.text_dims()
    n = int(getattr(cfg, "max_position_embeddings", 4096))
    positions = torch.arange(n)[None]
    probe = torch.zeros(1, n, d.head_dim, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = adapter.decoder.rotary_emb(probe, positions)  # (1, n, head_dim): halves repeated
    half = d.head_dim // 2
    if not torch.equal(cos[0, :, :half], cos[0, :, half:]):
        raise ExportError("the fused decoder expects rotary tables whose two halves repeat (non-interleaved RoPE)")
    dtype = g.np_dtype
    return (g.const("cos_cache", cos[0, :, :half].numpy().astype(dtype)),
            g.const("sin_cache", sin[0, :, :half].numpy().astype(dtype)))  # fmt: skip


class _Graph:
    """Nodes and initializers being written, with fresh names."""

    def __init__(self, dtype: torch.dtype) -> None:
        from onnx import TensorProto

        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._names: dict[str, int] = {}
        self._consts: set[str] = set()
        table = {torch.float32: (TensorProto.FLOAT, np.float32), torch.float16: (TensorProto.FLOAT16, np.float16)}
        if dtype not in table:
            raise ExportError(f"the fused decoder is written in fp32 or fp16, not {dtype}")
        self.elem, self.np_dtype = table[dtype]

    def fresh(self, stem: str) -> str:
        self._names[stem] = self._names.get(stem, -1) + 1
        return f"{stem}_{self._names[stem]}"

    def const(self, name: str, value: np.ndarray | None) -> str:
        """Initializer ``name`` (added once; ``value`` None: already added)."""
        from onnx import numpy_helper

        if name not in self._consts:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
            self._consts.add(name)
        return name

    def node(self, op: str, inputs: list[str], outputs: int = 1, domain: str = "", named: list[str] | None = None,
             scope: str | None = None, **attrs: Any) -> Any:  # fmt: skip
        """Append one node; returns its output name (or names when ``outputs`` > 1 or ``named``)."""
        from onnx import helper

        name = self.fresh(f"{scope}/{op}" if scope else op)
        outs = named or [f"{name}_out{j}" for j in range(outputs)]
        node = helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs)
        if scope:  # the module path, as the exporter records it (quantize.down_projections matches it)
            node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr([scope]))
        self.nodes.append(node)
        return outs if (named or outputs > 1) else outs[0]

    def linear(self, x: str, weight: torch.Tensor, bias: torch.Tensor | None, scope: str) -> str:
        """``x @ weight.T (+ bias)`` with the weight transposed into a (in, out) initializer."""
        w = self.const(f"{scope}.weight", weight.detach().float().T.contiguous().numpy().astype(self.np_dtype))
        y = self.node("MatMul", [x, w], scope=scope)
        if bias is not None:
            b = self.const(f"{scope}.bias", bias.detach().float().numpy().astype(self.np_dtype))
            y = self.node("Add", [y, b], scope=scope)
        return y

    def norm(self, x: str, residual: str | None, module: torch.nn.Module, scope: str) -> tuple[str, str]:
        """RMSNorm of ``x + residual`` (of ``x`` alone for the first); returns (normed, new residual)."""
        w = self.const(f"{scope}.weight", module.weight.detach().float().numpy().astype(self.np_dtype))
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        if residual is None:
            return self.node("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=eps, scope=scope), x
        normed, summed = self.fresh("normed"), self.fresh("residual")
        self.node("SkipSimplifiedLayerNormalization", [x, residual, w], domain=MS, named=[normed, "", "", summed],
                  epsilon=eps, scope=scope)  # fmt: skip
        return normed, summed
