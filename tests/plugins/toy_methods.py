"""Two toy pruning methods, each written the way a plug-in adds one (one ``Method`` entry plus its
implementation): ``firstk`` (pre-LLM: the first k visual tokens) and ``normdrop`` (in-LLM: from layer K,
only the k visual rows with the largest hidden-state norm at layer K-1's input remain). Registered only
inside ``registered_toys()`` so the suite's own method lists stay as they are."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from vtprune import methods
from vtprune.prune import Selector
from vtprune.prune.baselines import pad_scores, valid_rank
from vtprune.runtime.layerwise import DropRouter, drop_budgets


def _first_scores(x: Tensor, valid: Tensor, k: int, cfg: Any) -> Tensor:
    """(B, N) fp32: earlier valid tokens score higher (exact integers: no ties to judge)."""
    rank = valid_rank(valid).float()
    return torch.where(valid, x.shape[1] - rank, pad_scores(valid))


class NormRouter(DropRouter):
    def score(self, index, layer, h, rope, visual, query):  # noqa: ANN001, ANN201
        if index != self.layer - 1:
            return None
        return h.index_select(1, visual).float().norm(dim=-1)  # (B, N_v)


FIRSTK = methods.Method("firstk", "pre", "the first k visual tokens (a toy)", selector=Selector(_first_scores),
                        stage_macs=lambda n, d, cfg: 7 * n)  # fmt: skip
NORMDROP = methods.Method(
    "normdrop", "in_llm", "keep the k largest-norm visual rows from layer K (a toy)",
    router=lambda cfg, adapter, n_text, n_visual: NormRouter(cfg.layer, drop_budgets(cfg, adapter.text_dims().layers,
                                                                                     n_visual)),
    default_layer=1, min_layer=1,
)  # fmt: skip


@contextlib.contextmanager
def registered_toys() -> Iterator[None]:
    with methods.registered(FIRSTK), methods.registered(NORMDROP):
        yield
