"""Choosing the next token from logits, the same way in every runtime (numpy; no framework state)."""

from __future__ import annotations

import numpy as np

from vtprune.config import SamplingConfig


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
