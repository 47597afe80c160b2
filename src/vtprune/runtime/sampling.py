"""Choosing the next token from logits, the same way in every runtime (numpy; no framework state)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from vtprune.config import SamplingConfig
from vtprune.errors import InputError


class TokenChooser:
    """Greedy or seeded temperature / top-k / top-p sampling over one logits row."""

    def __init__(self, cfg: SamplingConfig | None = None) -> None:
        self.cfg = cfg or SamplingConfig()
        self.rng = np.random.default_rng(self.cfg.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits: (V,) float -> chosen token id."""
        if self.cfg.greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.cfg.temperature
        order = np.argsort(-z, kind="stable")
        if self.cfg.top_k:
            order = order[: self.cfg.top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if self.cfg.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(p), self.cfg.top_p)) + 1  # smallest nucleus with mass >= top_p
            order, p = order[:cut], p[:cut] / p[:cut].sum()
        return int(self.rng.choice(order, p=p))


def new_token_room(config: Any, next_position: int, max_new_tokens: int) -> int:
    """How many tokens may be decoded after a prompt whose next position is ``next_position``: refuses a
    prompt that already fills the model's context, and caps ``max_new_tokens`` (with a warning) at the
    context's end, where position ids would leave what the model was trained on."""
    text = getattr(config, "text_config", None) or config
    limit = getattr(text, "max_position_embeddings", None)
    if not limit:
        return max_new_tokens
    if next_position >= limit:
        raise InputError(f"the prompt with its image spans {next_position} positions and the model's context is "
                         f"{limit}; shorten the prompt")  # fmt: skip
    room = limit - next_position
    if max_new_tokens > room:
        print(f"vtprune: warning: --max-new-tokens {max_new_tokens} runs past the model's {limit}-position context; "
              f"decoding at most {room} tokens", file=sys.stderr, flush=True)  # fmt: skip
        return room
    return max_new_tokens
