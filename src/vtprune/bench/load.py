"""A fixed competing load for benchmarks: a robot's computer is never idle, so latency is measured on a
busy machine as well as a quiet one (``vtprune bench --background-load N``)."""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Iterator

MAX_SECONDS = 4 * 3600  # a spinner outlives no benchmark by more than this, even if its parent is killed


def _spin(stop: multiprocessing.synchronize.Event, deadline: float) -> None:
    while not stop.is_set() and time.monotonic() < deadline:
        sum(range(20_000))  # pure-Python work: one busy core, no memory traffic to speak of


@contextlib.contextmanager
def background_load(processes: int) -> Iterator[None]:
    """``processes`` busy processes, each spinning one core, for the duration of the block."""
    if processes <= 0:
        yield
        return
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    deadline = time.monotonic() + MAX_SECONDS
    spinners = [ctx.Process(target=_spin, args=(stop, deadline), daemon=True) for _ in range(processes)]
    for p in spinners:
        p.start()
    try:
        yield
    finally:
        stop.set()
        for p in spinners:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
