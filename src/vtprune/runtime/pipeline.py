"""Pruned generation in PyTorch: image + prompt -> answer, visual tokens pruned before the LLM.

The pipeline owns the forward pass around the adapter's seams (no transformers class is patched):
preprocess -> vision -> prune -> prefill -> greedy decode. Kept tokens carry their unpruned position ids
(M-RoPE ids for Qwen2.5-VL), and decoding continues one past the largest prompt position, exactly where
the unpruned model would continue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

import torch
from torch import Tensor

from vtprune.config import PruneConfig, SamplingConfig
from vtprune.errors import InputError, InternalError
from vtprune.flops import FlopsReport, layerwise_prefill_macs, prefill_macs, prune_stage_macs
from vtprune.images import check_image_size
from vtprune.models.base import VlmAdapter
from vtprune.prune import VisualLayout, merge_visual, select_visual, tie_margins
from vtprune.prune.select import gather_positions, gather_tokens
from vtprune.runtime.generate import Generation, PromptFacts, generate
from vtprune.runtime.layerwise import LayerwiseDecoder, build_router
from vtprune.runtime.timing import StageTimer


@dataclass
class Prefill:
    """The (pruned) prompt as it enters the decoder. Batch size 1."""

    embeds: Tensor  # (1, n, D)
    position_ids: Tensor  # (1, n), or (3, 1, n) for M-RoPE
    seq_keep: Tensor  # (1, n) indices into the unpruned prompt of length L
    visual_keep: Tensor  # (1, K) indices into the image's N_v visual tokens
    prompt_len: int  # L, the unpruned prompt length
    layout: VisualLayout
    visual_rows: Tensor  # (K,) rows of ``embeds`` that hold visual tokens

    def query_rows(self, query: str) -> Tensor:
        """The in-LLM query set: the ``last`` prompt row, or every ``instruction`` row after the image."""
        n = self.embeds.shape[1]
        if query == "last":
            return torch.tensor([n - 1])
        return torch.arange(int(self.visual_rows.max()) + 1, n)


@dataclass(frozen=True)
class Follow:
    """Selections another backend made, for the reference to adopt instead of its own (parity checks):
    ``visual`` (1, K) kept visual-token indices before the LLM; ``layers`` routed layer -> kept visual
    token ids. The pipeline records their tie margins under its own scores (``prune.ties``)."""

    visual: Tensor | None = None
    layers: dict[int, Tensor] | None = None


F = TypeVar("F", bound=Callable[..., Any])


def on_model_device(fn: F) -> F:
    """Run a ``PrunedVlm`` method with the model's device as the default for new tensors.

    The pipeline's own index and mask tensors (and the pruning methods') are created without naming a
    device; inside this scope they land where the weights are, so one code path serves CPU and CUDA.
    """

    @wraps(fn)
    def scoped(self: PrunedVlm, *args: Any, **kwargs: Any) -> Any:
        with self.device:
            return fn(self, *args, **kwargs)

    return scoped  # type: ignore[return-value]


class PrunedVlm:
    """A loaded VLM adapter plus a pruning config, driven as one generation pipeline.

    It runs on the device that holds the adapter's weights (``adapter.model.to("cuda")`` first for a GPU);
    stage timings are then CUDA-synchronised.
    """

    def __init__(
        self,
        adapter: VlmAdapter,
        cfg: PruneConfig,
        sampling: SamplingConfig | None = None,
        follow: Follow | None = None,
    ) -> None:
        adapter.check_prune(cfg)
        self.adapter = adapter
        self.cfg = cfg
        self.sampling = sampling or SamplingConfig()
        self.device = next(adapter.model.parameters()).device
        self.follow = follow or Follow()
        # set by ``build_prefill`` when following a kept set: the method's own choice (1, K) and, per group,
        # the followed set's tie margin
        self.last_own_keep: Tensor | None = None
        self.last_margins: list[float] = []

    def timer(self) -> StageTimer:
        """A stage timer that waits for the GPU at stage edges when the model is on one."""
        return StageTimer(sync_cuda=self.device.type == "cuda")

    def inputs(self, image: Any, prompt: str, raw_prompt: bool = False) -> dict[str, Tensor]:
        """Processor outputs for one image and a question (or a raw prompt holding the image slot)."""
        check_image_size(image, self.adapter.min_image_side)
        if raw_prompt:
            self.adapter.check_prompt(prompt)
        text = prompt if raw_prompt else self.adapter.format_prompt(prompt)
        try:
            inputs = self.adapter.prepare(image, text)
        except ValueError as exc:  # the family's processor rejects the image (e.g. extreme aspect ratio)
            w, h = image.size
            raise InputError(f"the {self.adapter.family} processor cannot use this {w}x{h} image: {exc}") from None
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}

    @torch.inference_mode()
    @on_model_device
    def build_prefill(self, inputs: dict[str, Tensor], timer: StageTimer | None = None) -> Prefill:
        """Vision encoder, pruning and merge: the decoder's input embeddings and position ids."""
        timer = timer or self.timer()
        ids = inputs["input_ids"]
        if ids.shape[0] != 1:
            raise InternalError("the PyTorch pipeline runs one prompt at a time")
        layout, visual_keep, kept = self.visual_tokens(inputs, timer)  # (1, K), (1, K, D)
        image_pos = (ids[0] == self.adapter.image_token_id).nonzero().squeeze(-1)  # (N_v,)
        if image_pos.numel() != layout.num_tokens:
            raise InternalError(f"{image_pos.numel()} image slots for {layout.num_tokens} visual tokens")
        embeds = self.adapter.embed_tokens(ids).clone()  # (1, L, D)
        embeds[:, image_pos[visual_keep[0]]] = kept.to(embeds.dtype)
        seq_keep = self._sequence_keep(ids.shape[1], image_pos, visual_keep)  # (1, n)
        positions = self.adapter.position_ids(inputs)
        if self.cfg.positions == "contiguous":
            positions = torch.arange(seq_keep.shape[1]).expand_as(gather_positions(positions, seq_keep))
        else:
            positions = gather_positions(positions, seq_keep)
        visual_rows = torch.isin(seq_keep[0], image_pos).nonzero().squeeze(-1)
        return Prefill(
            gather_tokens(embeds, seq_keep), positions, seq_keep, visual_keep, ids.shape[1], layout, visual_rows
        )

    def visual_tokens(self, inputs: dict[str, Tensor], timer: StageTimer) -> tuple[VisualLayout, Tensor, Tensor]:
        """The image's layout, kept visual-token indices (1, K) ascending, and their embeddings (1, K, D).

        Encoder methods (VisionZip) choose and merge on the vision encoder's feature layer, and only
        the K kept tokens go through the projector.
        """
        if not self.cfg.in_encoder:
            with timer.stage("vision"):
                visual = self.adapter.encode_image(inputs)
            with timer.stage("prune"):
                keep = self._choose(visual.embeds, visual.layout)  # (1, K)
                # identity unless the method merges (pooling: each kept token becomes its window's mean)
                embeds = merge_visual(visual.embeds, visual.embeds, visual.layout, self.cfg, self.follow.visual)
            return visual.layout, keep, gather_tokens(embeds, keep)
        with timer.stage("vision"):
            enc = self.adapter.encoder_tokens(inputs)
        with timer.stage("prune"):
            keep = self._choose(enc.evidence, enc.layout)  # (1, K)
            merged = merge_visual(enc.features, enc.evidence, enc.layout, self.cfg, self.follow.visual)  # (1, N_v, C)
        with timer.stage("vision"):
            kept = self.adapter.project(gather_tokens(merged, keep))  # (1, K, D)
        return enc.layout, keep, kept

    def _choose(self, x: Tensor, layout: VisualLayout) -> Tensor:
        """The method's kept set (1, K), or the followed one (the method's own in ``last_own_keep``, the
        followed set's tie margins in ``last_margins``)."""
        own = select_visual(x, layout, self.cfg)
        if self.follow.visual is None:
            return own
        keep = self.follow.visual.to(x.device)
        self.last_own_keep, self.last_margins = own, tie_margins(x, layout, self.cfg, keep)
        return keep

    @staticmethod
    def _sequence_keep(length: int, image_pos: Tensor, visual_keep: Tensor) -> Tensor:
        is_text = torch.ones(length, dtype=torch.bool, device=image_pos.device)
        is_text[image_pos] = False
        text_pos = torch.arange(length, device=image_pos.device)[is_text]
        return torch.cat([text_pos, image_pos[visual_keep[0]]]).sort().values.unsqueeze(0)  # (1, n) ascending

    def decoder_step(self, embeds: Tensor, positions: Tensor, cache: Any) -> Tensor:
        """Run the decoder on new tokens with the cache; returns final-norm hidden states (1, t, D)."""
        past = cache.get_seq_length()
        # An explicit all-ones mask: with no mask, transformers reads position-id gaps as packed sequences.
        mask = torch.ones(embeds.shape[0], past + embeds.shape[1], dtype=torch.long, device=embeds.device)
        out = self.adapter.decoder(
            inputs_embeds=embeds, position_ids=positions, attention_mask=mask, past_key_values=cache, use_cache=True
        )
        return out.last_hidden_state

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.adapter.text_config)

    @torch.inference_mode()
    @on_model_device
    def prompt_logits(self, prefill: Prefill) -> Tensor:
        """Logits at every prefill position (1, n, V); for parity checks against transformers."""
        hidden = self.decoder_step(prefill.embeds, prefill.position_ids, self.new_cache())
        return self.adapter.lm_head(hidden)

    # --- the runner contract (``runtime.generate``) ---------------------------------------------------
    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Inference mode, with the model's device as the default for new tensors."""
        with torch.inference_mode(), self.device:
            yield

    def prefill_inputs(self, inputs: dict[str, Tensor], timer: StageTimer) -> Prefill:
        return self.build_prefill(inputs, timer)

    def next_position(self, prefill: Prefill) -> Tensor:
        return prefill.position_ids.amax(dim=-1, keepdim=True) + 1

    def facts(self, prefill: Prefill) -> PromptFacts:
        return PromptFacts(prefill.layout.num_tokens, self.visual_kept(prefill), prefill.prompt_len,
                           int(prefill.seq_keep.shape[1]))  # fmt: skip

    def first_logits(self, prefill: Prefill) -> tuple[Any, tuple[Callable, Any]]:
        """The prompt through the decoder (routed layer by layer for in-LLM methods): last logits and the
        decoding state (the step function and its cache)."""
        cache = self.new_cache()
        if self.cfg.in_llm:
            layerwise, hidden = self.layerwise_prefill(prefill, cache)
            return self._last_logits(hidden), (layerwise.step, cache)
        hidden = self.decoder_step(prefill.embeds, prefill.position_ids, cache)
        return self._last_logits(hidden), (self.decoder_step, cache)

    def next_logits(self, token: int, position: Tensor, state: tuple[Callable, Any]) -> tuple[Any, Any]:
        step, cache = state
        embeds = self.adapter.embed_tokens(torch.tensor([[token]]))
        return self._last_logits(step(embeds, position, cache)), state

    def snapshot(self, state: tuple[Callable, Any]) -> list[int]:
        """Each cache layer's length: a decoding state to rewind to (``restore``)."""
        return [layer.get_seq_length() if layer.is_initialized else 0 for layer in state[1].layers]

    def restore(self, state: tuple[Callable, Any], mark: list[int]) -> tuple[Callable, Any]:
        """The state as it was at ``mark``: the rows added since are cropped off each cache layer."""
        for layer, n in zip(state[1].layers, mark, strict=True):
            extra = (layer.get_seq_length() if layer.is_initialized else 0) - n
            if extra > 0:
                layer.crop(-extra)
        return state

    def layer_costs(self, prefill: Prefill) -> tuple[list[int], list[int]] | None:
        """In-LLM methods, after a prefill: visual tokens and prefill MACs of each decoder layer."""
        if not self.cfg.in_llm:
            return None
        return list(self.last_trace.visual), self.last_trace.layer_macs(self.adapter.text_dims())

    def generate(self, image: Any, prompt: str, max_new_tokens: int = 32, raw_prompt: bool = False) -> Generation:
        """Answer ``prompt`` about ``image`` with pruned visual tokens; per-stage wall times included."""
        return generate(self, image, prompt, max_new_tokens, raw_prompt)

    def layerwise_prefill(self, prefill: Prefill, cache: Any) -> tuple[LayerwiseDecoder, Tensor]:
        """In-LLM methods: the routed layer-by-layer prefill; the trace is kept in ``self.last_trace``."""
        n_visual = int(prefill.visual_rows.numel())
        router = build_router(self.cfg, self.adapter, prefill.embeds.shape[1] - n_visual, n_visual, self.follow.layers)
        layerwise = LayerwiseDecoder(self.adapter, router)
        hidden, self.last_trace = layerwise.prefill(
            prefill.embeds, prefill.position_ids, prefill.visual_rows, prefill.query_rows(self.cfg.query), cache
        )
        return layerwise, hidden

    def _last_logits(self, hidden: Tensor) -> Any:
        return self.adapter.lm_head(hidden[:, -1])[0].float().cpu().numpy()  # (V,)

    def visual_kept(self, prefill: Prefill) -> int:
        """Visual tokens kept: after the pruning stage, or the fewest any decoder layer processed (in-LLM)."""
        if self.cfg.in_llm:
            return min(self.last_trace.visual)
        return int(prefill.visual_keep.shape[1])

    def flops(self, prefill: Prefill) -> FlopsReport:
        dims = self.adapter.text_dims()
        if self.cfg.in_llm:  # after a prefill: what each layer actually processed
            trace = self.last_trace
            pruned = layerwise_prefill_macs(dims, trace.rows, trace.kv_rows)
            return FlopsReport(prefill_macs(dims, prefill.prompt_len), pruned, trace.selector_macs)
        sizes = [int(g.numel()) for g in prefill.layout.groups]
        stage = prune_stage_macs(self.cfg, sizes, prefill.embeds.shape[-1])
        return FlopsReport(prefill_macs(dims, prefill.prompt_len), prefill_macs(dims, prefill.seq_keep.shape[1]), stage)


def budget_summary(layout: VisualLayout, cfg: PruneConfig) -> dict[str, int]:
    """Kept tokens per group name (plus ``always``) for reports."""
    if not cfg.prunes:
        return {name: int(g.numel()) for name, g in zip(layout.names, layout.groups, strict=True)}
    return dict(zip(layout.names, layout.budgets(cfg.keep), strict=True)) | {"always": int(layout.always_keep.numel())}
