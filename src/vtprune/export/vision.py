"""Vision graph: pixels -> vision encoder -> projector -> pruning stage (custom ops) -> kept tokens.

Outputs are static for a fixed budget: ``image_embeds [B, K, D]``, ``kept_indices [B, K]`` (ascending;
index into the image's unpruned visual tokens, so a kept token's 1-D position is image_start + index)
and ``kept_valid [B, K]`` (False for padding slots: LLaVA-NeXT images smaller than the largest grid).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import vtprune.export.ops  # noqa: F401  (registers torch.ops.vtprune.*)
from vtprune import methods
from vtprune.config import PruneConfig
from vtprune.errors import ConfigError
from vtprune.prune import VisualLayout, selector
from vtprune.prune.select import gather_tokens

# LLaVA-NeXT token kinds fed to the graph
PAD, BASE, HR, NEWLINE = 0, 1, 2, 3



def gprune_graph_scores(x: Tensor, valid: Tensor, k: int, cfg: PruneConfig) -> Tensor:
    """G-Prune's scores as one custom op (``vtprune::GraphPropagate``), the method's ``graph_scores``.

    Methods without ``graph_scores`` have their pure score function traced to standard ops (random and
    uniform: a constant table and integer arithmetic on the valid ranks; divprune: its greedy loop
    unrolled over the static k, no ONNX Loop)."""
    return torch.ops.vtprune.graph_propagate(x, valid, cfg.theta, cfg.tau, cfg.iters)


def prune_tokens(
    x: Tensor, valid: Tensor, cfg: PruneConfig, k: int, grid: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """One group's pre-LLM pruning inside an exported graph: (B, N, D), (B, N) -> (B, k, D), (B, k) ascending.

    The method's budget-aware scores feed ``vtprune::TopKRoute``, which keeps, sorts and gathers; a
    merging method (pooling, on the group's ``grid``) rewrites the tokens first, in standard ops. The
    stage is specified in fp32: lower-precision tokens are cast up before both ops (so their function
    bodies see fp32) and the kept tokens cast back, which is exact.
    """
    xf = x.float()  # a no-op for fp32 graphs
    method = methods.get(cfg.method)
    sel, graph_scores = method.load("selector"), method.load("graph_scores")
    scores = graph_scores(xf, valid, k, cfg) if graph_scores else sel.group_scores(xf, valid, k, cfg, grid)
    if sel.merge is not None:
        xf = sel.group_merge(xf, xf, valid, k, cfg, None, grid)
    tokens, idx = torch.ops.vtprune.topk_route(xf, scores, k)
    return tokens.to(x.dtype), idx


def merge_tokens(x: Tensor, evidence: Tensor, valid: Tensor, cfg: PruneConfig, k: int) -> tuple[Tensor, Tensor]:
    """An encoder method's stage (VisionZip) inside an exported graph, before the projector: scores of the
    encoder evidence, merged features, then ``vtprune::TopKRoute``. (B, N, C), (B, N, E), (B, N) ->
    (B, k, C) kept pre-projector tokens, (B, k) indices ascending. Traced to standard ops + TopKRoute."""
    method = selector(cfg.method)
    xf = x.float()
    scores = method.scores(evidence, valid, k, cfg)  # (B, N) fp32
    tokens, idx = torch.ops.vtprune.topk_route(method.merge(xf, evidence, valid, k, cfg, None), scores, k)
    return tokens.to(x.dtype), idx


class LlavaVision(nn.Module):
    """LLaVA-1.5: ``pixel_values [B, 3, H, W]`` -> kept tokens of the single group."""

    def __init__(self, adapter: Any, cfg: PruneConfig, num_tokens: int) -> None:
        super().__init__()
        self.adapter, self.cfg = adapter, cfg
        layout = VisualLayout(num_tokens, (torch.arange(num_tokens),), torch.zeros(0, dtype=torch.long), ("image",))
        self.k = layout.budgets(cfg.keep)[0] if cfg.pre_llm else num_tokens

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.cfg.in_encoder:
            return self._encoder_method(pixel_values.to(self.adapter.model.dtype))
        feats = self.adapter.vision_features(pixel_values.to(self.adapter.model.dtype))  # (B, N, D)
        valid = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        if not self.cfg.pre_llm:
            idx = torch.arange(feats.shape[1], device=feats.device).expand(feats.shape[0], -1)
            return feats, idx, valid
        tokens, idx = prune_tokens(feats, valid, self.cfg, self.k)
        return tokens, idx, torch.ones_like(idx, dtype=torch.bool)

    def _encoder_method(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """VisionZip: choose and merge at the feature layer, then project only the k kept tokens."""
        feats, evidence = self.adapter.encoder_evidence(pixel_values)  # (B, N, C), (B, N, 1 + hd)
        valid = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        tokens, idx = merge_tokens(feats, evidence, valid, self.cfg, self.k)  # (B, k, C), (B, k)
        return self.adapter.project(tokens), idx, torch.ones_like(idx, dtype=torch.bool)


class LlavaNextVision(nn.Module):
    """LLaVA-NeXT with static shapes: a fixed maximum crop count P and packed length N_max.

    Inputs: ``pixel_values [B, P, 3, s, s]`` (zero crops past the image's own), ``pack_index [B, N_max]``
    (flat crop-feature index per packed position; see ``models.llava_next.packed_codes``) and
    ``token_kind [B, N_max]`` (PAD, BASE, HR, NEWLINE). Base view and high-res grid are pruned as
    separate groups with budgets split by capacity; every newline token is kept.
    """

    def __init__(self, adapter: Any, cfg: PruneConfig, per_crop: int, hr_capacity: int, max_rows: int) -> None:
        super().__init__()
        if cfg.pre_llm and selector(cfg.method).grid:
            raise ConfigError(f"--method {cfg.method} reads the token grid, which for LLaVA-NeXT's high-res view "
                              "varies per image; run it in PyTorch (vtprune run/eval --model)")  # fmt: skip
        self.adapter, self.cfg, self.per_crop, self.max_rows = adapter, cfg, per_crop, max_rows
        self.k_base, self.k_hr = (
            VisualLayout(0, (torch.zeros(per_crop), torch.zeros(hr_capacity)), torch.zeros(0), ("base", "hr"),
                         (per_crop, hr_capacity)).budgets(cfg.keep)
            if cfg.pre_llm else (per_crop, hr_capacity)
        )  # fmt: skip

    def forward(self, pixel_values: Tensor, pack_index: Tensor, token_kind: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats = self.adapter.vision_features(pixel_values.to(self.adapter.model.dtype))  # (B, P * per_crop, D)
        packed = gather_tokens(feats, pack_index)  # (B, N_max, D)
        newline = self.adapter.model.model.image_newline.to(packed.dtype)
        packed = torch.where((token_kind == NEWLINE).unsqueeze(-1), newline, packed)
        if not self.cfg.pre_llm:
            idx = torch.arange(packed.shape[1], device=packed.device).expand(packed.shape[0], -1)
            return packed, idx, token_kind != PAD
        parts = [self._group(packed, token_kind, BASE, 0, self.k_base),
                 self._group(packed, token_kind, HR, self.per_crop, self.k_hr), self._newlines(packed, token_kind)]
        tokens, idx, valid = (torch.cat([p[i] for p in parts], dim=1) for i in range(3))  # fmt: skip
        order = torch.where(valid, idx, idx + packed.shape[1]).argsort(dim=-1)  # valid first, ascending
        return gather_tokens(tokens, order), idx.gather(1, order), valid.gather(1, order)

    def _group(self, packed: Tensor, kind: Tensor, which: int, start: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
        x, valid = packed[:, start:], kind[:, start:] == which
        if which == BASE:
            x, valid = x[:, : self.per_crop], valid[:, : self.per_crop]
        tokens, idx = prune_tokens(x, valid, self.cfg, k)
        return tokens, idx + start, valid.gather(1, idx)

    def _newlines(self, packed: Tensor, kind: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        is_newline = kind == NEWLINE
        pos = torch.arange(kind.shape[1], device=kind.device).expand_as(kind)
        key = torch.where(is_newline, -pos.float(), torch.full_like(pos, -1e9, dtype=torch.float32))
        idx = key.topk(self.max_rows, dim=-1).indices.sort(dim=-1).values  # (B, R_max) newline slots
        return gather_tokens(packed, idx), idx, is_newline.gather(1, idx)


def llava_next_static_inputs(config: Any, image_size: Tensor, max_crops: int, n_max: int) -> dict[str, Tensor]:
    """``pack_index`` and ``token_kind`` of one image for ``LlavaNextVision``: (1, N_max) each."""
    from vtprune.models.llava_next import packed_codes

    codes = packed_codes(config, image_size)
    per_crop = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    if codes.numel() > n_max or int(codes.max()) >= max_crops * per_crop:
        raise ConfigError(f"image {tuple(image_size.tolist())} needs more tokens than the exported graph's {n_max}")
    kind = torch.full((n_max,), PAD, dtype=torch.long)
    kind[: codes.numel()] = torch.where(codes < 0, NEWLINE, torch.where(codes < per_crop, BASE, HR))
    index = torch.zeros(n_max, dtype=torch.long)
    index[: codes.numel()] = codes.clamp_min(0)
    return {"pack_index": index[None], "token_kind": kind[None]}


OUTPUTS = ["image_embeds", "kept_indices", "kept_valid"]


# --- export entry point ----------------------------------------------------------------------------
def _llava_spec(adapter: Any, cfg: PruneConfig, sample: dict[str, Tensor]) -> dict[str, Any]:
    pixels = sample["pixel_values"].repeat(2, 1, 1, 1)  # batch 2 so the batch axis stays symbolic
    n = adapter.vision_features(pixels[:1].to(adapter.model.dtype)).shape[1]
    module = LlavaVision(adapter, cfg, n)
    meta = {"num_tokens": n} | (encoder_method_meta(cfg, module.k) if cfg.in_encoder else {})
    return {"module": module, "args": (pixels,), "inputs": ["pixel_values"],
            "dynamic": {"pixel_values": {0: torch.export.Dim.DYNAMIC}}, "meta": meta}  # fmt: skip


def encoder_method_meta(cfg: PruneConfig, k: int) -> dict[str, Any]:
    """What an encoder method's kept indices mean, for the manifest (VisionZip: dominant + targets)."""
    from vtprune.prune.visionzip import split_budget

    dominant, contextual = split_budget(k)
    return {"visionzip": {
        "dominant": dominant, "contextual": contextual, "feature_layer": "vision_feature_layer",
        "kept_indices": "ascending union of the dominant patches and one target patch per contextual "
                        "token; a contextual token is the mean (pre-projector) of its target and the patches "
                        "assigned to it, placed at the target's index and position id",
    }}  # fmt: skip


def _llava_next_spec(adapter: Any, cfg: PruneConfig, sample: dict[str, Tensor]) -> dict[str, Any]:
    from vtprune.models.llava_next import max_grid

    config = adapter.config
    side = config.vision_config.image_size
    per_side = side // config.vision_config.patch_size
    rows, cols = max_grid(config)
    max_crops = 1 + max((h // side) * (w // side) for h, w in config.image_grid_pinpoints)
    n_max = per_side**2 + max(((h // side) * per_side) * ((w // side) * per_side + 1)
                              for h, w in config.image_grid_pinpoints)  # fmt: skip
    pixels = torch.zeros(2, max_crops, *sample["pixel_values"].shape[2:])
    pixels[:, : sample["pixel_values"].shape[1]] = sample["pixel_values"]
    static = llava_next_static_inputs(config, sample["image_sizes"][0], max_crops, n_max)
    module = LlavaNextVision(adapter, cfg, per_side**2, rows * cols, rows)
    args = (pixels, static["pack_index"].repeat(2, 1), static["token_kind"].repeat(2, 1))
    batch = torch.export.Dim.DYNAMIC
    meta = {"max_crops": max_crops, "n_max": n_max, "per_crop": per_side**2, "hr_capacity": rows * cols,
            "max_rows": rows, "k_base": module.k_base, "k_hr": module.k_hr}  # fmt: skip
    return {"module": module, "args": args, "inputs": ["pixel_values", "pack_index", "token_kind"],
            "dynamic": {"pixel_values": {0: batch}, "pack_index": {0: batch}, "token_kind": {0: batch}},
            "meta": meta}  # fmt: skip


# Native resolution: the most pixels a bundle's processor lets through (1280 merged tokens, the value Qwen's
# model card suggests for bounded memory), below the checkpoint's own limit.
QWEN_MAX_PIXELS = 1280 * 28 * 28
# Pre-LLM methods whose graph is fixed by the token count: pooling's matrix, random's seeded priority table.
FIXED_GRID_METHODS = ("pool", "random")
QWEN_DYNAMIC_INPUTS = ["pixel_values", "vision_position_ids", "cu_seqlens", "window_index", "cu_window_seqlens",
                       "token_positions"]  # fmt: skip


def _qwen_spec(adapter: Any, cfg: PruneConfig, sample: dict[str, Tensor]) -> dict[str, Any]:
    """Pre-LLM methods and unpruned bundles: one graph for any image size (``dynamic``), the budget K fixed.
    In-LLM methods route a prefill graph of fixed length and ``FIXED_GRID_METHODS`` build constants of the
    token count, so their vision graph keeps the sample's grid (the runtime resizes images to it)."""
    grid = sample["image_grid_thw"][0].tolist()
    outputs, patch = [*OUTPUTS, "kept_positions"], qwen_vision_patched(adapter)
    if cfg.in_llm or cfg.method in FIXED_GRID_METHODS:
        module = QwenVision(adapter, cfg, grid)
        return {"module": module, "args": (sample["pixel_values"],), "inputs": ["pixel_values"], "dynamic": None,
                "meta": {"grid_thw": module.grid, "num_tokens": module.n}, "outputs": outputs, "patch": patch}
    module = QwenVision(adapter, cfg, grid, dynamic=True)
    bounds = qwen_pixel_bounds(adapter, module.k if cfg.pre_llm else 0)  # unpruned: the checkpoint's minimum
    feeds = qwen_feeds(adapter, sample, {})
    args = tuple(torch.from_numpy(feeds[name]) for name in QWEN_DYNAMIC_INPUTS)
    dim = torch.export.Dim
    merge2 = int(adapter.config.vision_config.spatial_merge_size) ** 2
    m = dim("merged_tokens", min=max(bounds["min_tokens"], 2), max=bounds["max_tokens"])
    dynamic = ({0: merge2 * m}, {0: merge2 * m}, None, {0: m}, {0: dim("windows_plus_one", min=2, max=4096)},
               {1: m})  # fmt: skip
    meta = {"dynamic_grid": True, "num_tokens": None, "budget": module.k if cfg.pre_llm else None, **bounds}
    return {"module": module, "args": args, "inputs": QWEN_DYNAMIC_INPUTS, "dynamic": dynamic, "meta": meta,
            "outputs": outputs, "patch": patch}  # fmt: skip


def qwen_pixel_bounds(adapter: Any, k: int) -> dict[str, int]:
    """Set (on ``adapter``'s image processor, which the bundle saves) and return the pixel bounds of a
    dynamic-grid bundle: at least K merged tokens (a pruning budget; smaller images are upscaled by the
    processor; 0 keeps the checkpoint's minimum), at most ``QWEN_MAX_PIXELS``."""
    proc = adapter.processor.image_processor
    unit = (adapter.patch_size * int(adapter.config.vision_config.spatial_merge_size)) ** 2  # pixels per token
    lo, hi = int(proc.size["shortest_edge"]), min(int(proc.size["longest_edge"]), QWEN_MAX_PIXELS)
    lo = max(lo, k * unit)
    if lo > hi:
        raise ConfigError(f"--keep {k}: Qwen2.5-VL images give at most {hi // unit} visual tokens here; keep fewer")
    proc.size = {"shortest_edge": lo, "longest_edge": hi}
    return {"min_pixels": lo, "max_pixels": hi, "min_tokens": max(lo // unit, 1), "max_tokens": hi // unit}


def qwen_feeds(adapter: Any, inputs: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The vision graph's inputs for one image: its patches and, computed on the host from its grid (as
    TensorRT Edge-LLM does), the rotary position ids, attention segments, window order, and each merged
    token's (t, h, w) M-RoPE offsets. A fixed-grid graph (``meta["grid_thw"]``) takes the patches only."""
    from transformers import vision_utils

    pixels = inputs["pixel_values"].numpy()
    if meta.get("grid_thw") is not None:
        return {"pixel_values": pixels}
    vc = adapter.config.vision_config
    grid, merge = inputs["image_grid_thw"].reshape(1, 3), int(vc.spatial_merge_size)
    wi, cuw = vision_utils.get_vision_window_index(grid, merge, vc.window_size, vc.patch_size)
    t, h, w = (int(v) for v in grid[0])
    gh, gw = h // merge, w // merge
    ids = np.stack(np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")).reshape(3, -1)
    return {"pixel_values": pixels,
            "vision_position_ids": vision_utils.get_vision_position_ids(grid, merge).numpy().astype(np.int64),
            "cu_seqlens": np.array([0, t * h * w], dtype=np.int32), "window_index": wi.numpy().astype(np.int64),
            "cu_window_seqlens": np.asarray(cuw, dtype=np.int32), "token_positions": ids.astype(np.int64)}  # fmt: skip


@dataclass(frozen=True)
class VisionExport:
    """How a family's vision + pruning graph is traced and fed.

    ``spec(adapter, cfg, sample)`` gives the module to trace, its example args, input names, dynamic axes,
    the manifest ``meta`` and optionally ``outputs`` and a ``patch`` context; ``feeds(adapter, inputs,
    meta)`` turns the processor's tensors into the graph's numpy inputs (default: ``pixel_values``).
    """

    spec: Callable[[Any, PruneConfig, dict[str, Tensor]], dict[str, Any]]
    feeds: Callable[[Any, dict[str, Tensor], dict[str, Any]], dict[str, np.ndarray]] | None = None

    def graph_feeds(self, adapter: Any, inputs: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, np.ndarray]:
        if self.feeds is not None:
            return self.feeds(adapter, inputs, meta)
        return {"pixel_values": inputs["pixel_values"].numpy()}


_VISION_EXPORTS: dict[str, VisionExport] = {}


def register_vision_export(family: str, export: VisionExport) -> VisionExport:
    """Make ``export`` the vision graph of ``family`` (a ``VlmAdapter.family``)."""
    if family in _VISION_EXPORTS:
        raise ValueError(f"family {family!r} already has a vision export")
    _VISION_EXPORTS[family] = export
    return export


def vision_export(family: str) -> VisionExport:
    """The registered vision export of ``family``, or one line saying there is none."""
    if family not in _VISION_EXPORTS:
        raise ConfigError(f"vision export is not implemented yet for {family} (families with one: "
                          f"{', '.join(_VISION_EXPORTS)})")  # fmt: skip
    return _VISION_EXPORTS[family]


def _llava_next_feeds(adapter: Any, inputs: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """Crops padded to the graph's largest grid, plus the static pack index and token kinds of this image."""
    pixels = inputs["pixel_values"].numpy()
    padded = np.zeros((pixels.shape[0], meta["max_crops"], *pixels.shape[2:]), pixels.dtype)
    padded[:, : pixels.shape[1]] = pixels
    static = llava_next_static_inputs(adapter.config, inputs["image_sizes"][0], meta["max_crops"], meta["n_max"])
    return {"pixel_values": padded} | {k: v.numpy() for k, v in static.items()}


register_vision_export("llava", VisionExport(_llava_spec))
register_vision_export("llava_next", VisionExport(_llava_next_spec, _llava_next_feeds))
register_vision_export("qwen2_5_vl", VisionExport(_qwen_spec, qwen_feeds))


def export_vision(adapter: Any, cfg: PruneConfig, sample: dict[str, Tensor], path: Any, opset: int) -> dict:
    """Export the vision + pruning graph of ``adapter`` to ``path``; returns its IO description."""
    from vtprune.export.decoder import eager_attention
    from vtprune.export.onnx_io import export_module

    family = vision_export(adapter.family)
    if cfg.method == "gprune" and cfg.degree != "mask":
        raise ConfigError("export supports --degree mask only (the fp32 neighbour count)")
    adapter.check_prune(cfg)
    spec = family.spec(adapter, cfg, sample)
    with spec.get("patch") or contextlib.nullcontext(), eager_attention(adapter.config.vision_config):
        io = export_module(spec["module"], spec["args"], path, spec["inputs"], spec.get("outputs", OUTPUTS),
                           spec["dynamic"], opset)  # fmt: skip
    return io | {"meta": spec["meta"]}


# --- Qwen2.5-VL ------------------------------------------------------------------------------------
class QwenVision(nn.Module):
    """Qwen2.5-VL's vision tower and pruning: ``pixel_values [n_patches, C*tp*p*p]`` -> kept tokens, plus
    ``kept_positions [3, 1, K]``, the kept tokens' M-RoPE (t, h, w) ids relative to the image's start.

    ``dynamic``: any image size (``n_patches`` is a graph dimension), the grid-derived tensors are graph
    inputs computed on the host (``qwen_feeds``) and K is fixed by the budget. Otherwise one fixed grid
    (the runtime resizes images to it) whose grid-derived tensors are constants."""

    def __init__(self, adapter: Any, cfg: PruneConfig, grid_thw: list[int], dynamic: bool = False) -> None:
        from transformers import vision_utils

        super().__init__()
        self.adapter, self.cfg, self.grid, self.dynamic = adapter, cfg, grid_thw, dynamic
        visual, grid = adapter.model.model.visual, torch.tensor([grid_thw])
        merge = visual.spatial_merge_size
        self.pre = {  # grid-derived constants, precomputed eagerly so nothing data-dependent is traced
            "position_ids": vision_utils.get_vision_position_ids(grid, merge).tolist(),
            "cu_seqlens": vision_utils.get_vision_attention_seqlens(grid, visual.config)[0].tolist(),
            "window_index": None, "cu_window_seqlens": None,
        }  # fmt: skip
        wi, cuw = vision_utils.get_vision_window_index(grid, merge, visual.window_size, visual.patch_size)
        self.pre["window_index"], self.pre["cu_window_seqlens"] = wi.tolist(), cuw.tolist()
        self.gh, self.gw = grid_thw[1] // merge, grid_thw[2] // merge
        self.n = grid_thw[0] * self.gh * self.gw
        self.k = single_budget(self.n, cfg)

    def forward(self, pixel_values: Tensor, vision_position_ids: Tensor | None = None, cu_seqlens: Tensor | None = None,
                window_index: Tensor | None = None, cu_window_seqlens: Tensor | None = None,
                token_positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        visual = self.adapter.model.model.visual
        if self.dynamic:
            pre = {"position_ids": vision_position_ids, "cu_seqlens": cu_seqlens, "window_index": window_index,
                   "cu_window_seqlens": cu_window_seqlens}  # fmt: skip
        else:
            pre = {k: torch.tensor(v, dtype=torch.int32 if k.startswith("cu") else torch.long)
                   for k, v in self.pre.items()}  # fmt: skip
        # grid_thw only feeds the helpers that derive the tensors given in ``pre``.
        out = visual(pixel_values.to(visual.dtype), grid_thw=torch.tensor([self.grid]), **pre)
        feats = out.pooler_output.unsqueeze(0)  # (1, N, D) merger output, raster order over (t, h, w)
        n = feats.shape[1]
        valid = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        if self.cfg.pre_llm:
            grid = None if self.dynamic else (self.n // self.gw, self.gw)
            tokens, idx = prune_tokens(feats, valid, self.cfg, self.k, grid)
        else:
            tokens, idx = feats, torch.arange(n, device=feats.device)[None]
        if self.dynamic:
            rel = token_positions[:, idx]  # (3, 1, K)
        else:
            per_frame = self.gh * self.gw
            rel = torch.stack([idx // per_frame, (idx % per_frame) // self.gw, idx % self.gw])  # (3, 1, K)
        tokens = tokens.to(self.adapter.model.get_input_embeddings().weight.dtype)  # merger: maybe an fp32 island
        return tokens, idx, torch.ones_like(idx, dtype=torch.bool), rel


def single_budget(n: int, cfg: PruneConfig) -> int:
    layout = VisualLayout(n, (torch.arange(n),), torch.zeros(0, dtype=torch.long), ("image",))
    return layout.budgets(cfg.keep)[0] if cfg.pre_llm else n


def _masked_vision_attention(attn: nn.Module) -> Any:
    """A forward for one Qwen2.5-VL vision attention module that uses a block-diagonal mask built from
    ``cu_seqlens`` instead of splitting the sequence by data-dependent lengths (untraceable)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    def forward(hidden_states: Tensor, cu_seqlens: Tensor, position_embeddings: Any = None, **_: Any) -> Tensor:
        seq = hidden_states.shape[0]
        q, k, v = attn.qkv(hidden_states).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, S, hd)
        pos = torch.arange(seq, device=hidden_states.device)
        segment = (pos[:, None] >= cu_seqlens[None, 1:]).sum(-1)  # (S,) window/image id of each patch
        mask = segment[:, None] == segment[None, :]  # (S, S) block-diagonal
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        return attn.proj(out.squeeze(0).transpose(0, 1).reshape(seq, -1))

    return forward


@contextlib.contextmanager
def qwen_vision_patched(adapter: Any) -> Iterator[None]:
    """Scoped, restoring patch of each vision attention *instance* for export (no class is touched)."""
    blocks = adapter.model.model.visual.blocks
    originals = [blk.attn.__dict__.get("forward") for blk in blocks]
    try:
        for blk in blocks:
            blk.attn.forward = _masked_vision_attention(blk.attn)
        yield
    finally:
        for blk, orig in zip(blocks, originals, strict=True):
            if orig is None:
                del blk.attn.forward
            else:
                blk.attn.forward = orig
