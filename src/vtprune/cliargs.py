"""Argument types shared by every command: each bad value becomes argparse's one-line error (exit 2)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

MAX_NEW_TOKENS = 65536  # above any supported model's context; the run itself stops at the context's end
SEED_MAX = 2**32 - 1  # numpy's and the samplers' seed range


def count(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer in ``lo..hi``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            span = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give an integer {span}")
        return value

    parse.__name__ = "count"
    return parse


def threads(text: str) -> int:
    """A thread count between 1 and this machine's CPUs (more only makes the threads fight for cores)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        return count(1, cpus)(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (this machine gives vtprune {cpus} CPUs)") from None


def text(value: str) -> str:
    """Prompt text that is valid Unicode (argv bytes that are not UTF-8 arrive as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text; check the terminal's encoding") from None
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty")
    return value


seed = count(0, SEED_MAX)
new_tokens = count(1, MAX_NEW_TOKENS)
