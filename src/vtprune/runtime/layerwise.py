"""In-LLM token selection: the decoder run layer by layer, each layer on the rows a router picks.

Pre-LLM methods hand the decoder a shorter sequence; in-LLM methods need the layer loop itself. This
module owns that loop around the adapter's decoder stack (``layers``, ``rotary_emb``, ``norm``; the
transformers layers are called as they are, nothing is patched):

* **skip** routers (ALVTS, ALGORITHMS.md §2.4): layer l runs on the text rows plus the visual rows it
  selected, with their original position ids; the other visual rows bypass the layer unchanged and
  everything is scattered back, so the next layer chooses again from all visual tokens. With
  ``kv_visible`` the skipped rows still supply keys/values (the layer runs on every row, only the
  selected rows take its output). Each layer's KV cache holds exactly the rows it processed.
* **drop** routers (FastV, DART): from layer K on, the unselected visual rows are gone for good.

Decoding continues with the same loop: one new token per step attends to each layer's own cache
(cache lengths differ per layer; the query always lies after every cached position).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vtprune import methods
from vtprune.config import PruneConfig
from vtprune.errors import ConfigError, UnsupportedModelError
from vtprune.flops import TextDims, layer_macs
from vtprune.prune.alvts import PaperSelector, data_free_selector, lowrank_selector_macs, paper_selector
from vtprune.prune.attention import QkWeights, attention_rows, visual_importance
from vtprune.prune.select import keep_topk
from vtprune.prune.ties import as_mask, follow_topk, topk_margin, value_range


@dataclass
class LayerContext:
    """What a router sees before layer l runs. Indices are rows of the current sequence (batch 1)."""

    hidden: Tensor  # (1, n, D) the layer's input
    rope: tuple[Tensor, Tensor]  # (1, n, hd) cos, sin of the current rows
    visual: Tensor  # (N_cur,) rows holding visual tokens
    query: Tensor  # (n_q,) rows of the query set (last prompt token or instruction tokens)


@dataclass
class Trace:
    """What a prefill did per layer: rows processed, key/value rows, visual rows processed."""

    rows: list[int] = field(default_factory=list)
    kv_rows: list[int] = field(default_factory=list)
    visual: list[int] = field(default_factory=list)
    selected: dict[int, Tensor] = field(default_factory=dict)  # layer -> kept visual token ids (0..N_v-1)
    margins: dict[int, float] = field(default_factory=dict)  # layer -> tie margin of a followed selection
    layer_selector_macs: dict[int, int] = field(default_factory=dict)

    @property
    def selector_macs(self) -> int:
        return sum(self.layer_selector_macs.values())

    def layer_macs(self, dims: TextDims) -> list[int]:
        """Prefill MACs of each layer: its rows (and key/value rows) plus its selector."""
        return [layer_macs(dims, n, m) + self.layer_selector_macs.get(i, 0)
                for i, (n, m) in enumerate(zip(self.rows, self.kv_rows, strict=True))]  # fmt: skip


class Router(ABC):
    """Chooses, before each layer, the visual rows it processes; the one implementation of an in-LLM method,
    run eagerly by ``LayerwiseDecoder`` (batch 1) and traced into the exported prefill graph (batched).

    ``budgets[l]`` is the number of visual rows layer l processes (the image's N_v where it is not routed).
    ``score`` gives, before layer l, batched scores of the visual rows (or None where it scores nothing);
    ``choose`` turns the latest scores into layer l's kept rows with a given top-k (eager: ``keep_topk``;
    export: ``vtprune::TopKRoute``). ``drops``: unselected visual rows leave for good.

    ``follow`` (layer -> kept visual token ids, from another backend) makes a router adopt those selections
    instead of its own and record, per layer, their tie margin under its own scores (``prune.ties``): the
    reference a parity check runs on the other backend's choices. Token ids equal the visual rows' indices
    at every selecting layer: skip routers keep every visual row, drop routers select once.
    """

    drops = False
    kv_visible = False
    follow: dict[int, Tensor] | None = None
    # A layer whose budget covers every visual row runs on all rows without scoring (same result, no
    # selector cost); False runs the selection anyway (tests exercise the path at k = N).
    skip_full_budgets = True

    def __init__(self, budgets: list[int]) -> None:
        self.budgets = budgets
        self._scores: Tensor | None = None

    @abstractmethod
    def selects(self, index: int) -> bool:
        """True where layer ``index`` chooses its visual rows (given enough visual rows)."""

    @abstractmethod
    def score(self, index: int, layer: torch.nn.Module, h: Tensor, rope: tuple[Tensor, Tensor], visual: Tensor,
              query: Tensor) -> Tensor | None:  # fmt: skip
        """(B, N_v) scores of the ``visual`` rows from ``h`` (B, L, D), the input of layer ``index``, or None."""

    def choose(self, index: int, h: Tensor, visual: Tensor, scores: Tensor, k: int, topk: TopK) -> Tensor:
        """(B, k) ascending indices into the visual rows kept by layer ``index``: by default the top k."""
        return topk(h, visual, scores, k)

    def margin(self, index: int, h: Tensor, visual: Tensor, scores: Tensor, keep: Tensor) -> float:
        """Tie margin of keeping ``keep`` (k,) instead of ``choose``'s set (batch 1)."""
        return float(topk_margin(scores, keep[None])[0])

    def selector_macs(self, index: int, n_rows: int, n_q: int, n_v: int) -> int | None:
        """MACs of layer ``index``'s selection beyond the layer itself (None: not counted separately)."""
        return None

    def plan(self, index: int, layer: torch.nn.Module, ctx: LayerContext, trace: Trace) -> Tensor | None:
        """Rows (ascending, into the current sequence) layer ``index`` processes; None for all of them."""
        n_v = ctx.visual.numel()
        if not self.selects(index + 1) and not self.selects(index):
            return None
        if self.selects(index) and self.budgets[index] >= n_v and self.skip_full_budgets:
            return None
        scores = self.score(index, layer, ctx.hidden, ctx.rope, ctx.visual, ctx.query)
        self._scores = scores if scores is not None else self._scores
        if not self.selects(index):
            return None
        if self.follow is None:
            k = min(self.budgets[index], n_v)
            keep = self.choose(index, ctx.hidden, ctx.visual, self._scores, k, _eager_topk)[0]
        else:
            keep = self.follow[index]
            trace.margins[index] = self.margin(index, ctx.hidden, ctx.visual, self._scores, keep)
        trace.selected[index] = keep
        macs = self.selector_macs(index, ctx.hidden.shape[1], ctx.query.numel(), n_v)
        if macs is not None:
            trace.layer_selector_macs[index] = macs
        return _with_text(ctx, ctx.visual[keep])


# (h (B, L, D), visual rows (N_v,), scores (B, N_v), k) -> (B, k) ascending indices into the visual rows
TopK = Callable[[Tensor, Tensor, Tensor, int], Tensor]


def _eager_topk(h: Tensor, visual: Tensor, scores: Tensor, k: int) -> Tensor:
    return keep_topk(scores, k)


def _with_text(ctx: LayerContext, kept_visual_rows: Tensor) -> Tensor:
    is_visual = torch.zeros(ctx.hidden.shape[1], dtype=torch.bool)
    is_visual[ctx.visual] = True
    return torch.cat([(~is_visual).nonzero().squeeze(-1), kept_visual_rows]).sort().values


class ExactSelector:
    """The layer's real attention from the query rows to the visual tokens (RoPE, causal, per-head softmax,
    head- and query-mean), recomputed from its projections: what the low-rank proxy approximates (batch 1,
    PyTorch only)."""

    def __init__(self, weights: QkWeights) -> None:
        self.w = weights

    def layer_scores(self, x: Tensor, rope: tuple[Tensor, Tensor], visual: Tensor, query: Tensor) -> Tensor:
        keys = torch.cat([visual, query]).unique()  # visual keys plus the queries' own (causal context)
        return visual_importance(self.w, x[0], rope, query, visual, keys)[None]

    def layer_macs(self, n_rows: int, n_q: int, n_v: int) -> int:
        w = self.w
        d = w.q_weight.shape[1]
        return n_v * d * w.kv_heads * w.head_dim + n_q * d * w.heads * w.head_dim + n_q * n_v * w.heads * w.head_dim


class AlvtsRouter(Router):
    """ALVTS: from layer l0 on, each layer keeps the k_l visual tokens its selector ranks highest."""

    def __init__(self, selectors: dict[int, Any], budgets: list[int], kv_visible: bool = False) -> None:
        super().__init__(budgets)
        self.selectors, self.kv_visible = selectors, kv_visible

    def selects(self, index: int) -> bool:
        return index in self.selectors

    def score(self, index: int, layer: torch.nn.Module, h: Tensor, rope: tuple[Tensor, Tensor], visual: Tensor,
              query: Tensor) -> Tensor | None:  # fmt: skip
        if index not in self.selectors:
            return None
        return self.selectors[index].layer_scores(layer.input_layernorm(h), rope, visual, query)

    def selector_macs(self, index: int, n_rows: int, n_q: int, n_v: int) -> int:
        return self.selectors[index].layer_macs(n_rows, n_q, n_v)


class DropRouter(Router):
    """Scores the visual rows with layer K-1's input, then drops all but k of them before layer K."""

    drops = True

    def __init__(self, layer: int, budgets: list[int]) -> None:
        super().__init__(budgets)
        self.layer, self.k = layer, budgets[min(layer, len(budgets) - 1)]

    def selects(self, index: int) -> bool:
        return index == self.layer


class FastVRouter(DropRouter):
    """FastV: attention the last prompt token pays each visual token at layer K-1, head-averaged,
    recomputed from that layer's own projections (one query row), so fused attention stays in use."""

    def __init__(self, layer: int, budgets: list[int], heads: int, kv_heads: int) -> None:
        super().__init__(layer, budgets)
        self.heads, self.kv_heads = heads, kv_heads

    def score(self, index: int, layer: torch.nn.Module, h: Tensor, rope: tuple[Tensor, Tensor], visual: Tensor,
              query: Tensor) -> Tensor | None:  # fmt: skip
        if index != self.layer - 1:
            return None
        x, w = layer.input_layernorm(h), QkWeights.of(layer.self_attn, self.heads, self.kv_heads)  # (B, L, D)
        keys = torch.arange(h.shape[1], device=h.device)
        cos, sin = rope
        probs = attention_rows(w, x[:, -1:], x, (cos[:, -1:], sin[:, -1:]), (cos, sin), keys[-1:], keys)
        return probs.mean(dim=(-3, -2)).index_select(-1, visual)  # (B, H, 1, L) -> (B, N_v)


class DartRouter(DropRouter):
    """DART: pivots are the visual tokens with the largest key norm at layer K-1 (RoPE keeps norms);
    each pivot then claims, in turn, the not-yet-chosen visual tokens least cosine-similar to it in
    the final-norm hidden states at layer K, until k tokens (pivots included) are kept."""

    PIVOTS = 4

    def __init__(self, layer: int, budgets: list[int], final_norm: torch.nn.Module) -> None:
        super().__init__(layer, budgets)
        self.final_norm = final_norm

    def score(self, index: int, layer: torch.nn.Module, h: Tensor, rope: tuple[Tensor, Tensor], visual: Tensor,
              query: Tensor) -> Tensor | None:  # fmt: skip
        if index != self.layer - 1:
            return None
        return layer.self_attn.k_proj(layer.input_layernorm(h).index_select(1, visual)).float().norm(dim=-1)

    def choose(self, index: int, h: Tensor, visual: Tensor, scores: Tensor, k: int, topk: TopK) -> Tensor:
        return dart_select(self.final_norm(h).index_select(1, visual), scores, k, self.PIVOTS)

    def margin(self, index: int, h: Tensor, visual: Tensor, scores: Tensor, keep: Tensor) -> float:
        x = self.final_norm(h).index_select(1, visual)  # (1, N_v, D)
        kept, tie = _dart_steps(x, scores, self.k, self.PIVOTS, as_mask(keep[None], scores.shape[-1]))
        same = torch.equal(kept[0], keep.sort().values)
        return float(tie[0]) if same else float("inf")


def dart_select(x: Tensor, key_norms: Tensor, k: int, pivots: int) -> Tensor:
    """DART selection on (..., N, D) features: (..., k) ascending indices; pivots are the ``pivots``
    largest key norms; the rest is split evenly over the pivots (earlier pivots take the remainder).
    Static in k and the pivot count (an unrolled loop of gathers, top-k and scatters: exportable)."""
    return _dart_steps(x, key_norms, k, pivots, None)[0]


def _dart_steps(x: Tensor, key_norms: Tensor, k: int, pivots: int, prefer: Tensor | None) -> tuple[Tensor, Tensor]:
    """``dart_select``'s set or, with ``prefer`` ((B, N) bool, batched inputs), every decision replayed
    towards it (``ties.follow_topk``); and the worst decision's tie margin (B,) (0 without ``prefer``)."""
    p = min(pivots, k)
    margins = []

    def top(values: Tensor, m: int, candidates: Tensor | None) -> Tensor:
        if prefer is None:
            return (values if candidates is None else values.masked_fill(~candidates, float("-inf"))).topk(m).indices
        every = torch.ones_like(prefer)  # a claim's margin is relative to the spread over all tokens
        chosen, tie = follow_topk(values, m, prefer, every if candidates is None else candidates,
                                  value_range(values, every))  # fmt: skip
        margins.append(tie)
        return chosen

    chosen = top(key_norms, p, None)  # (..., p)
    taken = torch.zeros(key_norms.shape, dtype=torch.bool, device=x.device).scatter(-1, chosen, True)
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    extra, kept = k - p, [chosen]
    for i in range(p):
        share = extra // p + (1 if i < extra % p else 0)
        if share == 0:
            continue
        at = chosen[..., i : i + 1, None].expand(*unit.shape[:-2], 1, unit.shape[-1])
        sim = (unit @ unit.gather(-2, at).transpose(-1, -2)).squeeze(-1)  # (..., N) cosine to the pivot
        pick = top(-sim, share, ~taken)  # least similar first
        taken = taken.scatter(-1, pick, True)
        kept.append(pick)
    worst = torch.stack(margins).amax(dim=0) if margins else torch.zeros(key_norms.shape[:-1], dtype=torch.float64)
    return torch.cat(kept, dim=-1).sort(dim=-1).values, worst


def layer_stack(adapter: Any) -> Any:
    """The adapter's decoder stack (``layers``, ``rotary_emb``, ``norm``), refused where per-layer selection
    cannot run."""
    stack = adapter.decoder
    if getattr(stack, "has_sliding_layers", False):
        raise UnsupportedModelError("in-LLM token selection does not support sliding-window attention layers")
    return stack


def needs_causal_mask(adapter: Any) -> bool:
    """SDPA applies ``is_causal`` itself; other attention kernels need an explicit mask for prefills."""
    return adapter.text_config._attn_implementation != "sdpa"


def run_layer(layer: torch.nn.Module, h: Tensor, rope: tuple[Tensor, Tensor], cache: Any, causal_mask: bool) -> Tensor:
    """One transformers decoder layer on rows ``h`` (ascending positions) with their rotary tables; it appends
    its keys/values to ``cache``."""
    mask = None
    if causal_mask and h.shape[1] > 1:
        n = h.shape[1]
        mask = torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device).triu(1)[None, None]
    return layer(h, attention_mask=mask, position_embeddings=rope, past_key_values=cache, use_cache=True)


class LayerwiseDecoder:
    """Runs the adapter's decoder layer by layer with a router; prefill and one-token decode steps."""

    def __init__(self, adapter: Any, router: Router) -> None:
        stack = layer_stack(adapter)
        self.layers, self.rotary, self.norm = stack.layers, stack.rotary_emb, stack.norm
        self.router = router
        self.eager_mask = needs_causal_mask(adapter)

    def _run(self, layer: torch.nn.Module, h: Tensor, rope: tuple[Tensor, Tensor], cache: Any) -> Tensor:
        return run_layer(layer, h, rope, cache, self.eager_mask)

    @torch.inference_mode()
    def prefill(
        self, embeds: Tensor, positions: Tensor, visual: Tensor, query: Tensor, cache: Any
    ) -> tuple[Tensor, Trace]:
        """Prefill over the whole prompt (batch 1).

        Args:
            embeds: (1, L, D) prompt embeddings with the visual tokens in place.
            positions: (1, L) position ids, or (3, 1, L) M-RoPE ids.
            visual: (N_v,) rows of the visual tokens; query: rows of the router's query set.
            cache: an empty transformers ``DynamicCache``.

        Returns:
            Final-norm hidden states of the rows that survive to the end (1, n_end, D), and the trace.
        """
        h, trace = embeds, Trace()
        cos, sin = self.rotary(h, positions)
        token_ids = torch.arange(visual.numel())  # the visual rows' token ids, kept in step with ``visual``
        for index, layer in enumerate(self.layers):
            ctx = LayerContext(h, (cos, sin), visual, query)
            rows = self.router.plan(index, layer, ctx, trace)
            if rows is None:
                h = self._run(layer, h, (cos, sin), cache)
                trace.rows.append(h.shape[1]), trace.kv_rows.append(h.shape[1]), trace.visual.append(visual.numel())
                continue
            n_vis = int(torch.isin(rows, visual).sum())
            if index in trace.selected:
                trace.selected[index] = token_ids[trace.selected[index]]
            if self.router.drops:  # the unselected visual rows leave the sequence for good
                n_old, token_ids = h.shape[1], token_ids[torch.isin(visual, rows)]
                h, cos, sin = h[:, rows], cos[:, rows], sin[:, rows]
                visual, query = _remap(visual, rows, n_old), _remap(query, rows, n_old)
                h = self._run(layer, h, (cos, sin), cache)
                trace.rows.append(h.shape[1]), trace.kv_rows.append(h.shape[1])
            elif self.router.kv_visible:  # every row gives K/V; only the selected rows take the output
                out = self._run(layer, h, (cos, sin), cache)
                take = torch.zeros(h.shape[1], dtype=torch.bool)
                take[rows] = True
                h = torch.where(take[None, :, None], out, h)
                trace.rows.append(rows.numel()), trace.kv_rows.append(out.shape[1])
            else:  # full skip: the layer sees only the selected rows; the others pass unchanged
                out = self._run(layer, h[:, rows], (cos[:, rows], sin[:, rows]), cache)
                h = h.index_copy(1, rows, out)
                trace.rows.append(rows.numel()), trace.kv_rows.append(rows.numel())
            trace.visual.append(n_vis)
        return self.norm(h), trace

    @torch.inference_mode()
    def step(self, embeds: Tensor, positions: Tensor, cache: Any) -> Tensor:
        """One decode step: (1, 1, D) embeddings at ``positions`` -> (1, 1, D) final-norm hidden states."""
        h = embeds
        rope = self.rotary(h, positions)
        for layer in self.layers:
            h = self._run(layer, h, rope, cache)
        return self.norm(h)


def _remap(rows_old: Tensor, kept: Tensor, n_old: int) -> Tensor:
    """Indices ``rows_old`` (into the old sequence of ``n_old`` rows) that survive, as indices into ``kept``."""
    new_index = torch.full((n_old,), -1, dtype=torch.long)
    new_index[kept] = torch.arange(kept.numel())
    mapped = new_index[rows_old]
    return mapped[mapped >= 0]


# --- building routers from a PruneConfig ---------------------------------------------------------
def layer_budget(keep: int | float, n_visual: int) -> int:
    """A method's per-layer visual budget: a count, or a ratio of the image's visual tokens."""
    k = keep if isinstance(keep, int) else max(1, int(keep * n_visual + 1e-9))
    return min(k, n_visual)


def alvts_budgets(cfg: PruneConfig, dims: TextDims, n_text: int, n_visual: int, rank: int) -> list[int]:
    """Visual tokens each layer processes: N_v below ``cfg.layer``, k from there on (§2.2).

    With ``cfg.budget == "flops"``, k is the largest constant budget whose prefill MACs (layers below l0
    at full length, selector costs included) stay within those of keeping ``cfg.keep`` visual tokens in
    every layer, so it is usually *smaller* than ``keep``; at least 1.
    """
    k = layer_budget(cfg.keep, n_visual)
    l0 = min(cfg.layer, dims.layers)
    if cfg.budget == "flops":
        target = dims.layers * layer_macs(dims, n_text + k)
        n_q = 1 if cfg.query == "last" else n_text  # an upper bound on the query set for the selector cost
        sel = lowrank_selector_macs(dims.hidden, rank, n_q, n_visual)
        fixed = l0 * layer_macs(dims, n_text + n_visual)

        def cost(kk: int) -> int:
            kv = n_text + (n_visual if cfg.skip == "kv" else kk)
            per = layer_macs(dims, n_text + kk, kv) + sel
            return fixed + (dims.layers - l0) * per

        k = max([1] + [kk for kk in range(1, n_visual + 1) if cost(kk) <= target])
    return [n_visual] * l0 + [k] * (dims.layers - l0)


def layer_budgets(cfg: PruneConfig, adapter: Any, n_text: int, n_visual: int) -> list[int]:
    """Visual rows each decoder layer processes under an in-LLM ``cfg`` for a prompt of this shape: the
    static per-layer budgets an exported prefill graph is built with."""
    return build_router(cfg, adapter, n_text, n_visual).budgets


def build_router(
    cfg: PruneConfig, adapter: Any, n_text: int, n_visual: int, follow: dict[int, Tensor] | None = None
) -> Router:
    """The router of an in-LLM ``cfg`` (its method's registered builder) on this adapter's decoder, for a
    prompt of this shape; with ``follow`` it adopts those per-layer selections (``Router``)."""
    layers = len(adapter.decoder.layers)
    if cfg.layer >= layers:
        raise ConfigError(f"--layer {cfg.layer}: this model has {layers} decoder layers, so {cfg.method} would "
                          f"select nothing; pass --layer below {layers}")  # fmt: skip
    router = methods.get(cfg.method).load("router")(cfg, adapter, n_text, n_visual)
    router.follow = follow
    return router


def drop_budgets(cfg: PruneConfig, layers: int, n_visual: int) -> list[int]:
    """A drop method's visual rows per layer: N_v below ``cfg.layer``, k from there on."""
    return [n_visual] * cfg.layer + [layer_budget(cfg.keep, n_visual)] * (layers - cfg.layer)


def fastv_router(cfg: PruneConfig, adapter: Any, n_text: int, n_visual: int) -> Router:
    dims = adapter.text_dims()
    return FastVRouter(cfg.layer, drop_budgets(cfg, dims.layers, n_visual), dims.heads, dims.kv_heads)


def dart_router(cfg: PruneConfig, adapter: Any, n_text: int, n_visual: int) -> Router:
    return DartRouter(cfg.layer, drop_budgets(cfg, adapter.text_dims().layers, n_visual), adapter.decoder.norm)


def alvts_router(cfg: PruneConfig, adapter: Any, n_text: int, n_visual: int) -> Router:
    dims, layers = adapter.text_dims(), adapter.decoder.layers
    if cfg.selector == "exact":
        selectors: dict[int, Any] = {
            i: ExactSelector(QkWeights.of(layer.self_attn, dims.heads, dims.kv_heads))
            for i, layer in enumerate(layers) if i >= cfg.layer
        }  # fmt: skip
        rank = dims.kv_heads * dims.head_dim  # the selector cost per visual token is a key projection
    else:  # the low-rank proxy or the paper's selector
        selectors = selectors_for(adapter, cfg)
        rank = max((s.rank for s in selectors.values()), default=cfg.rank)
    budgets = alvts_budgets(cfg, dims, n_text, n_visual, rank)  # a layer without a selector processes every row
    return AlvtsRouter(selectors, [k if i in selectors else n_visual for i, k in enumerate(budgets)], cfg.skip == "kv")


def selectors_for(adapter: Any, cfg: PruneConfig) -> dict[int, Any]:
    """The ALVTS selectors of layers >= ``cfg.layer`` (computed once per adapter): fitted factors from
    ``cfg.factors`` (``vtprune calib alvts``, ``--mode paper`` for the paper's selector), else the SVD
    factors at rank ``cfg.rank`` (data-free low-rank proxy, or the paper's W_Q / W_K initialisation). A
    SmoothQuant-ed copy of a model (``export.smooth.smoothed_copy``) gets its source model's selectors with
    their factors rescaled to its smoothed norms: the same token choices."""
    paper = cfg.selector == "paper"
    memo = adapter.__dict__.setdefault("_alvts_selectors", {})
    key = (cfg.selector, "factors", str(cfg.factors)) if cfg.factors is not None else (cfg.selector, cfg.rank)
    source = adapter.__dict__.get("smoothed_from")
    if key not in memo and source is not None:  # a SmoothQuant-ed copy (export.smooth): its source's selectors,
        scales = adapter.__dict__["selector_input_scales"]  # rescaled to the inputs its norms now give
        memo[key] = {i: sel.rescaled(scales[i]) for i, sel in selectors_for(source, cfg).items()}
    if key not in memo:  # once per adapter, not once per prompt
        if cfg.factors is not None:
            from vtprune.prune.factors import load_factors

            loaded = load_factors(cfg.factors, adapter, "paper" if paper else "calibrated")
            memo[key] = {i: PaperSelector(s) for i, s in loaded.items()} if paper else loaded
        else:
            dims, build = adapter.text_dims(), paper_selector if paper else data_free_selector
            memo[key] = {i: build(QkWeights.of(layer.self_attn, dims.heads, dims.kv_heads), cfg.rank)
                         for i, layer in enumerate(adapter.decoder.layers)}  # fmt: skip
    return {i: s for i, s in memo[key].items() if i >= cfg.layer}

