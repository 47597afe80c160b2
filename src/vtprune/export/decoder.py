"""Token embedding and language decoder to ONNX, for a runtime that owns the generation loop.

Two graphs:

- ``embed``: ``input_ids (B, S) int64 -> inputs_embeds (B, S, D)``, the adapter's ``embed_tokens``.
- ``decoder``: ONE graph for prefill and decode (the onnxruntime-genai / onnx-community layout). It takes
  the new tokens' embeddings, their position ids, an attention mask over past + new tokens and the past
  KV cache of every layer, and returns the logits of the LAST position only plus the grown cache.
  Prefill is the call with an empty past (P = 0).

Position ids are graph inputs and nothing in the graph derives them from P: after pruning, kept tokens
keep their unpruned positions, so positions have gaps and the next decode position is one past the
largest prompt position, not P. The attention mask is always passed to transformers; without it,
transformers 5 reads position-id gaps as packed sequences.

The graph is our own thin ``nn.Module`` around the adapter's seams (``decoder``, ``lm_head``): it builds a
``transformers.DynamicCache`` from the past tensors, so no transformers class is patched. Exported with
``torch.onnx.export(dynamo=True)``, which handles transformers 5's cache and mask code as is.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.errors import ExportError
from vtprune.models.base import VlmAdapter

PAST_KEY, PAST_VALUE = "past_key_values.{i}.key", "past_key_values.{i}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{i}.key", "present.{i}.value"

# Symbolic dimension names in the exported graphs (onnx-community naming).
BATCH, SEQUENCE, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"

# Example sizes for tracing: batch >= 2, S >= 2 and P >= 1, all distinct, so no dimension is specialised
# to a constant or unified with another one (PLATFORM.md §5).
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 3, 5


class EmbedGraph(nn.Module):
    """``input_ids (B, S) int64 -> inputs_embeds (B, S, D)`` through the adapter's ``embed_tokens``."""

    def __init__(self, adapter: VlmAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.table = adapter.model.get_input_embeddings()  # registered so export owns its weight

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.adapter.embed_tokens(input_ids)


class DecoderGraph(nn.Module):
    """Decoder + LM head on the last position, KV cache as flat tensors in and out.

    ``forward(inputs_embeds, position_ids, attention_mask, *past)`` where ``past`` is
    ``(key_0, value_0, key_1, value_1, ...)``, each ``(B, kv_heads, P, head_dim)``; returns
    ``(logits (B, 1, V), key_0', value_0', ...)`` with each present ``(B, kv_heads, P + S, head_dim)``.
    """

    def __init__(self, adapter: VlmAdapter) -> None:
        super().__init__()
        self.decoder = adapter.decoder
        self.lm_head = adapter.lm_head
        self.text_config = adapter.text_config
        self.num_layers = adapter.text_dims().layers

    def forward(self, inputs_embeds: Tensor, position_ids: Tensor, attention_mask: Tensor, *past: Tensor):
        cache = self._cache(past)
        out = self.decoder(
            inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
            past_key_values=cache, use_cache=True,
        )  # fmt: skip
        logits = self.lm_head(out.last_hidden_state[:, -1:]).float()  # (B, 1, V) fp32: the next token only
        present = [t for layer in cache.layers[: self.num_layers] for t in (layer.keys, layer.values)]
        return (logits, *present)

    def _cache(self, past: tuple[Tensor, ...]) -> Any:
        from transformers import DynamicCache

        if len(past) != 2 * self.num_layers:
            raise ValueError(f"expected {2 * self.num_layers} past tensors (key, value per layer), got {len(past)}")
        cache = DynamicCache(config=self.text_config)  # the same cache type the PyTorch pipeline uses
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)  # (B, kv_heads, P, head_dim) each
        return cache


def export_embed(adapter: VlmAdapter, path: Path, opset: int = 18) -> dict[str, Any]:
    """Export the token embedding to ONNX at ``path``.

    Args:
        adapter: a loaded VLM adapter.
        path: the ``.onnx`` file to write (replaced atomically).
        opset: ONNX opset (>= 18 for the dynamo exporter).

    Returns:
        The IO description (see ``io_spec``): ``input_ids (B, S) int64 -> inputs_embeds (B, S, D)``.
    """
    require_model(adapter)
    ids = torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_SEQ, dtype=torch.long)
    dims = {"input_ids": {0: torch.export.Dim(BATCH), 1: torch.export.Dim(SEQUENCE)}}
    program = export_program(EmbedGraph(adapter).eval(), (ids,), ["input_ids"], ["inputs_embeds"], dims, opset)
    files = save_program_atomic(program, Path(path))
    return io_spec(Path(path), "embed", files, opset, adapter)


def export_decoder(adapter: VlmAdapter, path: Path, opset: int = 18) -> dict[str, Any]:
    """Export the decoder (prefill and decode in one graph, last-position logits) to ONNX at ``path``.

    Graph inputs: ``inputs_embeds (B, S, D)``, ``position_ids (B, S)`` int64 (or ``(3, B, S)`` M-RoPE ids),
    ``attention_mask (B, P + S)`` int64, and ``past_key_values.{i}.key`` / ``.value``
    ``(B, kv_heads, P, head_dim)`` per layer; P may be 0. Outputs: ``logits (B, 1, V)`` and
    ``present.{i}.key`` / ``.value`` ``(B, kv_heads, P + S, head_dim)``.

    Args:
        adapter: a loaded VLM adapter.
        path: the ``.onnx`` file to write (replaced atomically; weights stay inside it below 2 GB).
        opset: ONNX opset (>= 18 for the dynamo exporter).

    Returns:
        The IO description (see ``io_spec``).
    """
    require_model(adapter)
    graph = DecoderGraph(adapter).eval()
    args = _decoder_example(adapter)
    inputs, outputs = decoder_names(graph.num_layers)
    with eager_attention(adapter.text_config):
        program = export_program(graph, args, inputs, outputs, _decoder_dims(args[1].ndim, graph.num_layers), opset)
    files = save_program_atomic(program, Path(path))
    return io_spec(Path(path), "decoder", files, opset, adapter)


@contextmanager
def eager_attention(config: Any) -> Iterator[None]:
    """Trace a transformers sub-model (the text decoder, the vision tower) with eager attention (matmuls,
    an additive mask, softmax in fp32), then restore the loaded implementation. The exporter decomposes
    SDPA into ``Where`` and ``IsNaN`` nodes that cost ONNX Runtime about 10% of the unpruned pocket prefill
    (393 -> 355 ms) and 11% of the pocket vision graph (70 -> 62 ms, 2-core CPU); the math is the same,
    and the export validation checks it against PyTorch."""
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


def decoder_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the decoder graph, in graph order."""
    past = [t.format(i=i) for i in range(num_layers) for t in (PAST_KEY, PAST_VALUE)]
    present = [t.format(i=i) for i in range(num_layers) for t in (PRESENT_KEY, PRESENT_VALUE)]
    return ["inputs_embeds", "position_ids", "attention_mask", *past], ["logits", *present]


def require_model(adapter: VlmAdapter) -> None:
    if adapter.model is None:
        raise ExportError(f"the {adapter.family} adapter was loaded for processing only; export needs its model")


def position_ids_rank(adapter: VlmAdapter) -> int:
    """3 for M-RoPE ids ``(3, B, S)`` (Qwen2-VL family), else 2 for ``(B, S)``."""
    cfg = adapter.text_config
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return 3 if "mrope_section" in rope else 2


def _decoder_example(adapter: VlmAdapter) -> tuple[Tensor, ...]:
    d, dtype = adapter.text_dims(), adapter.lm_head.weight.dtype
    b, s, p = _EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST
    embeds = torch.randn(b, s, d.hidden, dtype=dtype)
    positions = (torch.arange(s) * 2 + p + 3).expand(b, s)  # (B, S) with gaps, not derived from P
    if position_ids_rank(adapter) == 3:
        positions = positions.expand(3, b, s)  # (3, B, S)
    mask = torch.ones(b, p + s, dtype=torch.long)
    past = [torch.randn(b, d.kv_heads, p, d.head_dim, dtype=dtype) for _ in range(2 * d.layers)]
    return (embeds, positions.contiguous(), mask, *past)


def _decoder_dims(rank: int, num_layers: int) -> tuple[Any, ...]:
    dim = torch.export.Dim
    b, s, p, total = dim(BATCH), dim(SEQUENCE), dim(PAST), dim(TOTAL)
    positions = {1: b, 2: s} if rank == 3 else {0: b, 1: s}
    past = tuple({0: b, 2: p} for _ in range(2 * num_layers))  # one entry for the *past varargs
    # The mask length is its own symbol: nothing in the graph ties it to P + S (it is gathered at kv indices).
    return {0: b, 1: s}, positions, {0: b, 1: total}, past


def export_program(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], dims: Any, opset: int,
                   custom_ops: bool = False) -> Any:
    """``torch.onnx.export`` (dynamo) of ``module``; ``custom_ops`` maps ``torch.ops.vtprune.*`` to the
    custom-domain nodes (their function bodies are attached when the file is saved)."""
    extra = {}
    if custom_ops:
        from vtprune.export.ops.onnx_defs import translations

        extra["custom_translation_table"] = translations()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # Sharing one Dim across inputs (batch, past) makes the exporter warn that it keeps one name.
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used", category=UserWarning)
            return torch.onnx.export(
                module, args, None, dynamo=True, opset_version=opset, input_names=inputs,
                output_names=outputs, dynamic_shapes=dims, verbose=False, optimize=True, **extra,
            )  # fmt: skip
    except Exception as exc:  # the exporter raises many types; surface one line, keep the cause
        name = type(module).__name__
        raise ExportError(f"torch.onnx.export failed for {name}: {str(exc).splitlines()[0][:300]}") from exc


def save_program_atomic(program: Any, path: Path, check: Callable[[Path], None] | None = None) -> list[str]:
    """Save into a temp dir next to ``path``, check, then move into place (external data first, ``.onnx``
    last), so a failure never leaves a half-written ``.onnx``. Returns the file names written."""
    from vtprune.export.onnx_io import written_aside

    check = check or _check_model
    with written_aside(path) as tmp:
        program.save(tmp / path.name, **_external_kw(program))  # weights beside it above EXTERNAL_ABOVE
        check(tmp / path.name)
        extra = sorted(f.name for f in tmp.iterdir() if f.name != path.name)
    stale = path.with_name(path.name + ".data")
    if not extra and stale.exists():
        stale.unlink()  # left by an earlier, larger export to the same path
    return [path.name, *extra]


def _external_kw(program: Any) -> dict[str, Any]:
    """``external_data=True`` for an exported program whose weights pass ``onnx_io.EXTERNAL_ABOVE``."""
    from torch.onnx import ONNXProgram

    from vtprune.export.onnx_io import EXTERNAL_ABOVE, program_tensor_bytes

    if isinstance(program, ONNXProgram) and program_tensor_bytes(program) > EXTERNAL_ABOVE:
        return {"external_data": True}
    return {}


def _check_model(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)  # by path: works with external data too


def io_spec(path: Path, graph: str, files: list[str], opset: int, adapter: VlmAdapter) -> dict[str, Any]:
    """JSON-serialisable IO description of an exported graph, read back from the saved file.

    ``inputs``/``outputs`` use ``onnx_io.describe``'s format (the vision graph's too): a list of
    ``{"name", "dtype", "shape"}`` in graph order, shapes with ints for static dims and strings for
    symbolic ones (``batch_size``, ``sequence_length``, ``past_sequence_length``,
    ``total_sequence_length``, or an expression such as ``past_sequence_length + sequence_length``).
    """
    import onnx

    from vtprune.export.onnx_io import describe

    d = adapter.text_dims()
    spec = {"graph": graph, "files": files, "opset": opset, "exporter": "torch.onnx.export(dynamo=True)"}
    spec |= describe(onnx.load(str(path), load_external_data=False))
    spec |= {"num_layers": d.layers, "kv_heads": d.kv_heads, "head_dim": d.head_dim, "hidden": d.hidden}
    spec["vocab"] = d.vocab
    if graph in ("decoder", "prefill", "decode"):  # the language-model graphs (in-LLM bundles: prefill + decode)
        spec |= {
            "position_ids_rank": position_ids_rank(adapter), "logits": "last_position",
            "past_key": PAST_KEY, "past_value": PAST_VALUE, "present_key": PRESENT_KEY, "present_value": PRESENT_VALUE,
        }  # fmt: skip
    return spec
