"""The one timing primitive for stage timings (wall clock; CUDA-synchronised when a GPU is in use)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimer:
    """Accumulates wall time per named stage, in milliseconds, in the order stages first ran."""

    def __init__(self, sync_cuda: bool = False) -> None:
        self.ms: dict[str, float] = {}
        self._sync = sync_cuda

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3

    def _synchronize(self) -> None:
        if self._sync:
            import torch

            torch.cuda.synchronize()

    @property
    def total_ms(self) -> float:
        return sum(self.ms.values())
