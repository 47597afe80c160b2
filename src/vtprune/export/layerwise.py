"""In-LLM methods in the exported decoder: a routed prefill graph and a per-layer-cache decode graph.

A pre-LLM bundle's decoder sees an already shortened prompt; an in-LLM bundle (ALVTS, FastV) prunes
inside the decoder, so its language model is two graphs around the adapter's decoder layers (called as
they are, nothing patched), mirroring ``runtime.layerwise.LayerwiseDecoder``:

- ``prefill``: the whole prompt in, ``logits`` of the last position and each layer's KV cache out.
  The prompt layout arrives as three index inputs (``text_rows``, ``visual_rows``, ``query_rows``: rows
  of the prompt, ascending). Before each routed layer l the selector scores the visual rows from the
  layer's normalised input, ``vtprune::TopKRoute`` keeps the layer's static budget k_l (ascending), the
  text rows plus those visual rows are gathered with their rotary embeddings, the layer runs on them and
  the result is scattered back; skipped rows pass unchanged (ALVTS, ALGORITHMS.md §2.4). With ``--skip
  kv`` the layer runs on every row and only the routed rows take its output. FastV drops instead: from
  layer K on the sequence is the text rows plus the kept visual rows. The selector factors are
  initializers of the graph. ``selected.{l}`` outputs give each routed layer's kept visual tokens, so
  parity with PyTorch is checked per layer.
- ``decode``: one new token (``inputs_embeds (B, 1, D)``, its position ids) and every layer's past KV,
  each with its own length (``past_sequence_length_{l}``): layers cache only the rows they processed.
  The query lies after every cached position, so no mask is needed.

Shapes are static in the budgets (each k_l is a constant of the graph) and symbolic in the prompt
length, the number of text, visual and query rows, and the batch (every row of a batch shares one prompt
layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vtprune import methods
from vtprune.config import PruneConfig
from vtprune.errors import ConfigError, ExportError
from vtprune.export.decoder import (
    BATCH,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    SEQUENCE,
    eager_attention,
    io_spec,
    position_ids_rank,
    require_model,
)  # fmt: skip
from vtprune.prune.alvts import LayerSelector, PaperSelector
from vtprune.prune.select import gather_tokens

TEXT, VISUAL, QUERY = "text_length", "visual_length", "query_length"
PAST_OF = "past_sequence_length_{i}"
ROUTING_INPUTS = ["text_rows", "visual_rows", "query_rows"]

# Example sizes for tracing: all distinct and >= 2 so no dimension is specialised (PLATFORM.md §5).
_EXAMPLE_BATCH, _EXAMPLE_QUERY = 2, 2


def _cache(config: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=config)


class _Layers(nn.Module):
    """The adapter's decoder stack, final norm and LM head, run layer by layer."""

    def __init__(self, adapter: Any) -> None:
        from vtprune.runtime.layerwise import layer_stack, needs_causal_mask

        super().__init__()
        stack = layer_stack(adapter)
        self.layers, self.rotary, self.norm, self.lm_head = stack.layers, stack.rotary_emb, stack.norm, adapter.lm_head
        self.text_config = adapter.text_config
        self.eager_mask = needs_causal_mask(adapter)

    def run(self, layer: nn.Module, h: Tensor, rope: tuple[Tensor, Tensor], cache: Any) -> Tensor:
        from vtprune.runtime.layerwise import run_layer

        return run_layer(layer, h, rope, cache, self.eager_mask)

    def finish(self, h: Tensor, cache: Any) -> tuple[Tensor, ...]:
        logits = self.lm_head(self.norm(h[:, -1:])).float()  # (B, 1, V): the next token only
        present = [t for layer in cache.layers[: len(self.layers)] for t in (layer.keys, layer.values)]
        return (logits, *present)


class RoutedPrefillGraph(_Layers):
    """``forward(inputs_embeds (B, L, D), position_ids, text_rows (n_t,), visual_rows (N_v,), query_rows
    (n_q,))`` -> ``(logits (B, 1, V), present key/value per layer..., selected.{l} (B, k_l) per routed
    layer)``; see the module docstring. The method is its ``runtime.layerwise`` router, traced."""

    def __init__(self, adapter: Any, cfg: PruneConfig, n_text: int, n_visual: int) -> None:
        from vtprune.runtime.layerwise import build_router

        super().__init__(adapter)
        check_exportable(cfg)
        if not cfg.in_llm:
            raise ConfigError(f"--method {cfg.method} prunes before the decoder; its bundle uses decoder.onnx")
        self.router = build_router(cfg, adapter, n_text, n_visual)
        self.kv_visible = self.router.kv_visible
        self.budgets = self.router.budgets
        self.routed = [i for i, k in enumerate(self.budgets) if k < n_visual]  # process fewer visual rows
        self.selecting = [i for i in self.routed if self.router.selects(i)]  # choose them (ALVTS: every one)
        self.scale: dict[int, float] = {}
        self.paper = False
        for i, sel in getattr(self.router, "selectors", {}).items():
            if i in self.routed:  # the selector factors become initializers of the graph
                self.paper = isinstance(sel, PaperSelector)
                factors = sel.factors if self.paper else sel
                for name in ("a", "b", "u"):
                    self.register_buffer(f"alvts_{i}_{name}", getattr(factors, name).clone(), persistent=False)
                self.scale[i] = factors.scale

    def selector(self, i: int) -> LayerSelector | PaperSelector:
        """Layer ``i``'s selector over this module's buffers (what the trace records as initializers)."""
        factors = LayerSelector(getattr(self, f"alvts_{i}_a"), getattr(self, f"alvts_{i}_b"),
                                getattr(self, f"alvts_{i}_u"), self.scale[i])  # fmt: skip
        return PaperSelector(factors) if self.paper else factors

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, text_rows: Tensor, visual_rows: Tensor,
                query_rows: Tensor) -> tuple[Tensor, ...]:  # fmt: skip
        h, cache, router = inputs_embeds, _cache(self.text_config), self.router
        for i in self.scale:  # the router reads the factors through the traced buffers
            router.selectors[i] = self.selector(i)
        cos, sin = self.rotary(h, position_ids)  # (B, L, hd) each
        selected, scores = [], None
        for i, layer in enumerate(self.layers):
            if i + 1 in self.selecting or i in self.selecting:
                fresh = router.score(i, layer, h, (cos, sin), visual_rows, query_rows)
                scores = fresh if fresh is not None else scores
            if i not in self.selecting:
                h = self.run(layer, h, (cos, sin), cache)
                continue
            idx = router.choose(i, h, visual_rows, scores, self.budgets[i], _route)  # (B, k) into the visual rows
            selected.append(idx)
            rows = _with_text(text_rows, visual_rows, idx)  # (B, n)
            if router.drops:  # the unselected visual rows leave the sequence for good
                h, cos, sin = (gather_tokens(t, rows) for t in (h, cos, sin))
                h = self.run(layer, h, (cos, sin), cache)
                continue
            take = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device).scatter(1, rows, True)  # (B, L)
            if self.kv_visible:  # every row supplies keys/values; only the routed rows take the output
                out = self.run(layer, h, (cos, sin), cache)
            else:  # the layer sees only the routed rows; the others pass unchanged
                out = self.run(layer, gather_tokens(h, rows), (gather_tokens(cos, rows), gather_tokens(sin, rows)),
                               cache)  # fmt: skip
                # Back to full length with a one-hot (B, L, n) matmul: exact (one 1 per routed row) and about
                # n*L*D MACs. A ScatterElements, or a Gather through an inverse index, of the layer's output
                # fails TensorRT-RTX 1.7's Myelin compiler (CHECK(is_const()), measured).
                place = rows[:, None, :] == torch.arange(h.shape[1], device=h.device)[None, :, None]
                out = place.to(out.dtype) @ out
            h = torch.where(take[..., None], out, h)
        return (*self.finish(h, cache), *selected)


def _route(h: Tensor, visual_rows: Tensor, scores: Tensor, k: int) -> Tensor:
    """``vtprune::TopKRoute`` over the visual rows: (B, k) ascending indices into ``visual_rows``."""
    import vtprune.export.ops  # noqa: F401  (registers torch.ops.vtprune.*)

    _, idx = torch.ops.vtprune.topk_route(h.index_select(1, visual_rows), scores.float(), k)
    return idx


def _with_text(text_rows: Tensor, visual_rows: Tensor, idx: Tensor) -> Tensor:
    """(B, n) ascending rows a layer processes: every text row plus the visual rows ``idx`` (B, k) selects."""
    return torch.cat([text_rows.expand(idx.shape[0], -1), visual_rows[idx]], dim=1).sort(dim=1).values


class LayerwiseDecodeGraph(_Layers):
    """``forward(inputs_embeds (B, 1, D), position_ids (B, 1) | (3, B, 1), *past)`` -> ``(logits (B, 1, V),
    present...)``; layer l's past is ``(B, kv_heads, P_l, head_dim)`` with its own P_l."""

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        cache = _cache(self.text_config)
        for i in range(len(self.layers)):
            cache.update(past[2 * i], past[2 * i + 1], i)
        h = inputs_embeds
        rope = self.rotary(h, position_ids)
        for layer in self.layers:
            h = self.run(layer, h, rope, cache)
        return self.finish(h, cache)


# --- export ------------------------------------------------------------------------------------------
def check_exportable(prune: PruneConfig) -> None:
    """Refuse, before any model is loaded, an in-LLM config the exported decoder graphs cannot carry."""
    if prune.prunes and not prune.spec.exportable:
        can = ", ".join(m.name for m in methods.all_methods() if m.exportable)
        raise ConfigError(f"--method {prune.method} cannot be exported yet (exportable: {can}); run it in PyTorch "
                          "(vtprune run --model / vtprune eval)")  # fmt: skip
    if prune.in_llm and prune.selector == "exact":
        raise ConfigError("--selector exact recomputes full attention rows (a PyTorch diagnostic); export "
                          "--selector lowrank or paper")  # fmt: skip



def prefill_names(num_layers: int, routed: int) -> tuple[list[str], list[str]]:
    present = [t.format(i=i) for i in range(num_layers) for t in (PRESENT_KEY, PRESENT_VALUE)]
    return ["inputs_embeds", "position_ids", *ROUTING_INPUTS], ["logits", *present] + [
        f"selected.{j}" for j in range(routed)
    ]


def decode_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [t.format(i=i) for i in range(num_layers) for t in (PAST_KEY, PAST_VALUE)]
    present = [t.format(i=i) for i in range(num_layers) for t in (PRESENT_KEY, PRESENT_VALUE)]
    return ["inputs_embeds", "position_ids", *past], ["logits", *present]


def routing_example(adapter: Any, n_text: int, n_visual: int) -> tuple[Tensor, ...]:
    """Tracing inputs: a prompt of ``n_text`` text rows around ``n_visual`` visual rows, batch 2."""
    d, dtype = adapter.text_dims(), adapter.lm_head.weight.dtype
    length = n_text + n_visual
    before = min(2, n_text - 1)
    text = torch.cat([torch.arange(before), torch.arange(before + n_visual, length)])
    visual = torch.arange(before, before + n_visual)
    query = torch.arange(length - _EXAMPLE_QUERY, length)  # >= 2 rows: the graph serves any query set
    embeds = torch.randn(_EXAMPLE_BATCH, length, d.hidden, dtype=dtype)
    positions = torch.arange(length).expand(_EXAMPLE_BATCH, length)
    if position_ids_rank(adapter) == 3:
        positions = positions.expand(3, _EXAMPLE_BATCH, length)
    return embeds, positions.contiguous(), text, visual, query


def export_prefill(adapter: Any, cfg: PruneConfig, budgets: list[int], n_text: int, n_visual: int, path: Path,
                   opset: int = 18) -> dict[str, Any]:  # fmt: skip
    """Export the routed prefill graph of an in-LLM ``cfg`` with per-layer visual ``budgets`` to ``path``.

    Args:
        adapter: a loaded VLM adapter (its model is traced).
        cfg: the in-LLM pruning config (``alvts`` or ``fastv``).
        budgets: visual rows each layer processes; layers whose budget is below ``n_visual`` are routed.
        n_text, n_visual: the sample prompt's layout (for tracing; the graph takes any layout whose number
            of visual rows exceeds every routed budget).
        path: the ``.onnx`` file to write (atomically).

    Returns:
        The IO description, plus ``routing``: the budgets, routed layers and method settings.
    """
    require_model(adapter)
    if n_text < 3:
        raise ExportError(f"the sample prompt has {n_text} text tokens; tracing needs at least 3")
    with eager_attention(adapter.text_config):  # the graph then builds the explicit causal mask it needs
        graph = RoutedPrefillGraph(adapter, cfg, n_text, n_visual).eval()
        if graph.budgets != budgets:
            raise ExportError(f"the routed graph's budgets {graph.budgets} differ from the bundle's {budgets}")
        args = routing_example(adapter, n_text, n_visual)
        inputs, outputs = prefill_names(len(graph.layers), len(graph.selecting))
        if not graph.routed:
            outputs = outputs[: 1 + 2 * len(graph.layers)]
        dim = torch.export.Dim
        b, s = dim(BATCH), dim(SEQUENCE)
        k_max = max((budgets[i] for i in graph.routed), default=0)
        dims = ({0: b, 1: s}, {1: b, 2: s} if args[1].ndim == 3 else {0: b, 1: s}, {0: dim(TEXT)},
                {0: dim(VISUAL, min=k_max + 1)}, {0: dim(QUERY)})  # fmt: skip
        files = _export_with_ops(graph, args, inputs, outputs, dims, path, opset)
    routing = {"method": cfg.method, "selector": cfg.selector, "budgets": budgets, "routed_layers": graph.routed,
               "skip": cfg.skip,
               "query": cfg.query, "visual_tokens": n_visual, "min_visual_tokens": k_max + 1,
               "selector_ranks": {str(i): graph.selector(i).rank for i in graph.scale}}  # fmt: skip
    return io_spec(Path(path), "prefill", files, opset, adapter) | {"routing": routing}


def export_decode(adapter: Any, path: Path, opset: int = 18) -> dict[str, Any]:
    """Export the one-token decode graph with a KV cache of its own length per layer to ``path``."""
    require_model(adapter)
    d, dtype = adapter.text_dims(), adapter.lm_head.weight.dtype
    embeds = torch.randn(_EXAMPLE_BATCH, 1, d.hidden, dtype=dtype)
    positions = torch.full((_EXAMPLE_BATCH, 1), 40, dtype=torch.long)
    if position_ids_rank(adapter) == 3:
        positions = positions.expand(3, _EXAMPLE_BATCH, 1).contiguous()
    # distinct example lengths per layer so no two cache lengths are unified
    past = [torch.randn(_EXAMPLE_BATCH, d.kv_heads, 5 + i, d.head_dim, dtype=dtype)
            for i in range(d.layers) for _ in range(2)]  # fmt: skip
    b = torch.export.Dim(BATCH)
    pasts = tuple({0: b, 2: torch.export.Dim(PAST_OF.format(i=i // 2))} for i in range(2 * d.layers))
    dims = ({0: b}, {1: b} if positions.ndim == 3 else {0: b}, pasts)
    inputs, outputs = decode_names(d.layers)
    with eager_attention(adapter.text_config):
        graph = LayerwiseDecodeGraph(adapter).eval()
        files = _export_with_ops(graph, (embeds, positions, *past), inputs, outputs, dims, path, opset)
    return io_spec(Path(path), "decode", files, opset, adapter)


def _export_with_ops(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], dims: Any, path: Path,
                     opset: int) -> list[str]:  # fmt: skip
    """Export with the vtprune ops and save atomically with their function bodies; returns the files written."""
    from vtprune.export.decoder import export_program, save_program_atomic

    program = export_program(module, args, inputs, outputs, dims, opset, custom_ops=True)
    return save_program_atomic(_WithFunctions(program), Path(path))


class _WithFunctions:
    """An exported program whose saved file gets vtprune's function bodies attached. The weights are
    written by the exporter (external data above 2 GB) and left untouched: only the graph is rewritten."""

    def __init__(self, program: Any) -> None:
        self.program = program

    def save(self, path: Path) -> None:
        import onnx

        from vtprune.export.ops.onnx_defs import attach_functions

        self.program.save(path)
        onnx.save_model(attach_functions(onnx.load(str(path), load_external_data=False)), str(path))
