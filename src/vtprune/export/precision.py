"""Export precision: the model copy a bundle's graphs are traced from, and what stays fp32 inside them.

An fp16 bundle is traced from a deep copy of the loaded fp32 model cast to ``torch.float16``, so the
graphs carry what the model itself does in half precision, including the fp32 upcasts transformers
writes into its RMSNorms and rotary embeddings. On top of that, some modules are fp32 *islands*: their
weights stay fp32 and a forward pre-hook casts their floating inputs to fp32 (Qwen2.5-VL's last vision
block and patch merger, whose activations overflow fp16 in the 3B checkpoint; ANCHORS.md §2a). The
pruning stage is kept fp32 by the vision graph itself (``vision.prune_tokens``).

The fp32 reference used for validation is never modified: the copy is a separate model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.errors import ConfigError

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

# What each graph of an fp16 bundle computes in fp32, for the manifest (the why is in the README).
FP32_PARTS = {
    "vision": (
        "pixel_values input (cast to fp16 as the graph's first op)",
        "pruning stage: GraphPropagate/TopKRoute see fp32 tokens and scores; kept tokens cast back to fp16",
        "normalization statistics: LayerNormalization (stash_type=1), RMSNorm variance (transformers upcasts)",
        "rotary embeddings (computed in fp32 by transformers, cast to fp16)",
    ),
    "embed": (),
    "decoder": (
        "normalization statistics: RMSNorm variance (transformers upcasts)",
        "rotary embeddings (computed in fp32 by transformers, cast to fp16)",
        "logits output (lm_head runs in fp16, the result is cast to fp32)",
    ),
}
FP32_PARTS["decode"] = FP32_PARTS["decoder"]
FP32_PARTS["prefill"] = (
    *FP32_PARTS["decoder"],
    "in-LLM selectors: factors, scores and TopKRoute in fp32 (hidden states upcast; ties at the cut are judged "
    "like the vision graph's)",
)


def export_dtype(name: str) -> torch.dtype:
    if name not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype {name}: bundles export {' or '.join(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[name]


def export_copy(adapter: Any, dtype: str) -> Any:
    """The adapter whose model the graphs are traced from: ``adapter`` itself for fp32, else a new
    adapter around a deep copy of its model in ``dtype`` with the family's fp32 islands
    (``VlmAdapter.fp32_islands``) applied; an adapter already loaded in ``dtype`` (a lean export,
    ``export.memory``) gets its islands in place and is returned itself."""
    target = export_dtype(dtype)
    if target == adapter.model.dtype == torch.float32:
        return adapter
    if target == adapter.model.dtype:  # loaded in the export dtype (a lean export): islands applied in place
        apply_islands(adapter, adapter.model)
        return adapter
    model = copy.deepcopy(adapter.model).to(target)
    apply_islands(adapter, model)
    return type(adapter)(model, adapter.processor, adapter.path)


def apply_islands(adapter: Any, model: Any) -> None:
    """The family's fp32 islands of ``model``: fp32 weights, inputs cast to fp32 (once per model)."""
    if getattr(model, "_vtprune_islands", False):
        return
    for island in adapter.fp32_islands(model).values():
        island.float()
        island.register_forward_pre_hook(_inputs_to_fp32, with_kwargs=True)
    model._vtprune_islands = True


def fp32_parts(adapter: Any, graph: str) -> list[str]:
    """Human-readable list of what ``graph`` computes in fp32 for ``adapter``'s family."""
    islands = adapter.fp32_islands(adapter.model) if graph == "vision" else {}
    return list(FP32_PARTS[graph]) + [f"{name} (fp32 weights and activations)" for name in islands]


def _inputs_to_fp32(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return _fp32(args), {k: _fp32(v) for k, v in kwargs.items()}


def _fp32(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_fp32(v) for v in value)
    return value
