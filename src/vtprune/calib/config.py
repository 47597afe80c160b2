"""Calibration settings (no torch import: the CLI builds its parser from these defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from vtprune.config import QUERY_SETS
from vtprune.errors import ConfigError

RANKS = (16, 32, 64, 128, 256)  # the rank ladder calibration climbs (ALGORITHMS.md §2.3)


@dataclass(frozen=True)
class CalibConfig:
    """Calibration settings: ``n`` pairs (a ``heldout`` fraction of them choose the rank), the budget
    ``k`` recall is measured at, the query set, the recall target ``gamma`` and the ranks tried."""

    n: int = 128
    heldout: float = 0.25
    k: int = 28
    query: str = "last"
    gamma: float = 0.9
    ranks: tuple[int, ...] = RANKS
    seed: int = 0
    eps: float = 1e-4

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
