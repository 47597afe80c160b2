"""Custom ops of the pruning stage, with their three faces in one place.

- PyTorch: ``torch.ops.vtprune.graph_propagate`` and ``torch.ops.vtprune.topk_route`` wrap the pure
  reference functions of ``vtprune.prune`` (with fake kernels so ``torch.export`` can trace them).
- ONNX: custom-domain nodes ``vtprune::GraphPropagate`` and ``vtprune::TopKRoute`` with registered
  ``onnx.defs`` schemas (checker and shape inference pass) and model-local function bodies made only of
  standard ops: T unrolled, K constant, no Loop. ONNX Runtime inlines the bodies at load time; TensorRT's
  parser prefers a registered plugin of the same name and otherwise imports the body.
- Export: ``TRANSLATIONS`` maps the torch ops to the custom nodes for the dynamo exporter.

The G-Prune body bakes theta, tau and T in (one pruning config per model); the node keeps them as
attributes too, so a plugin reads the same values. TopKRoute reads ``k`` from its node attribute.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtprune.prune import gprune
from vtprune.prune.select import gather_tokens, keep_topk

DOMAIN = "vtprune"
DOMAIN_VERSION = 1


# --- PyTorch face ------------------------------------------------------------------------------
@torch.library.custom_op("vtprune::graph_propagate", mutates_args=())
def graph_propagate(x: Tensor, valid: Tensor, theta: float, tau: float, iters: int) -> Tensor:
    """G-Prune scores (B, N) fp32 of tokens x (B, N, D) with validity mask (B, N) bool."""
    return gprune.scores(x, theta, tau, iters, "mask", valid)


@graph_propagate.register_fake
def _(x: Tensor, valid: Tensor, theta: float, tau: float, iters: int) -> Tensor:
    return x.new_empty(x.shape[:2], dtype=torch.float32)


@torch.library.custom_op("vtprune::topk_route", mutates_args=())
def topk_route(x: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k by score, indices ascending, tokens gathered: (B, N, D), (B, N) -> (B, k, D), (B, k)."""
    idx = keep_topk(scores, k)
    return gather_tokens(x, idx), idx


@topk_route.register_fake
def _(x: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return x.new_empty((x.shape[0], k, x.shape[2])), x.new_empty((x.shape[0], k), dtype=torch.int64)
