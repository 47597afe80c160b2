"""Calibration settings (no torch import: the CLI builds its parser from these defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from vtprune.config import QUERY_SETS
from vtprune.errors import ConfigError

RANKS = (16, 32, 64, 128, 256)  # the rank ladder calibration climbs (ALGORITHMS.md §2.3)
MODES = ("whitened", "paper")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration settings: ``n`` pairs (a ``heldout`` fraction of them choose the rank or, in ``paper``
    mode, measure the fit), the budget ``k`` recall is measured at, the query set, the recall target
    ``gamma`` and the ranks tried (``whitened`` mode). ``paper`` mode (ALGORITHMS.md §2.1b) tunes the
    paper selector's rank-``rank`` factors per layer from their SVD initialisation with Adam (``steps``
    steps of ``batch`` pairs, learning rate ``lr``) on the MSE to the full-rank score."""

    n: int = 128
    heldout: float = 0.25
    k: int = 28
    query: str = "last"
    gamma: float = 0.9
    ranks: tuple[int, ...] = RANKS
    seed: int = 0
    eps: float = 1e-4
    mode: str = "whitened"
    rank: int = 64
    steps: int = 100
    batch: int = 16
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ConfigError(f"--n {self.n}: calibration needs at least 2 pairs (some are held out)")
        if not 0.0 < self.heldout < 1.0:
            raise ConfigError(f"--heldout {self.heldout} must be a fraction in (0, 1)")
        if self.k < 1:
            raise ConfigError(f"--keep {self.k} must be a positive token count")
        if self.query not in QUERY_SETS:
            raise ConfigError(f"--query {self.query!r} must be one of {', '.join(QUERY_SETS)}")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"--gamma {self.gamma} must be in (0, 1]")
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r} must be one of {', '.join(MODES)}")
        for name in ("rank", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)} must be a positive integer")
        if self.steps < 0:
            raise ConfigError(f"--steps {self.steps} must be >= 0")
        if not 0.0 < self.lr < 1.0:
            raise ConfigError(f"--lr {self.lr} must be in (0, 1)")
