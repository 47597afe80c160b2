"""Arguments shared by the commands: argument types (each bad value becomes argparse's one-line error,
exit 2) and the model and pruning argument groups."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from vtprune import methods
from vtprune.config import (
    BUDGET_MODES,
    DEGREE_MODES,
    POSITION_MODES,
    QUERY_SETS,
    SELECTOR_KINDS,
    SKIP_MODES,
    PruneConfig,
    parse_keep,
)

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


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help="pocket | tiny-llava | tiny-llava-next | tiny-qwen2.5-vl | DIR")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="model weights dtype")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights; only if you trust them")
    g.add_argument("--cache-dir", type=Path, help="where built-in tiny models are written (default ~/.cache/vtprune)")


def add_prune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning")
    g.add_argument("--method", choices=methods.names(with_none=True),
                   help="pruning method (default: gprune if --keep is given, else none); docs/methods.md")
    g.add_argument("--keep", type=str, help="visual tokens kept: a count K (e.g. 64) or a ratio (0.25 or 25%%)")
    d = PruneConfig()
    g.add_argument("--theta", type=float, default=d.theta, help="G-Prune cosine edge threshold")
    g.add_argument("--tau", type=float, default=d.tau, help="G-Prune softmax temperature")
    g.add_argument("--iters", type=count(0, 1000), default=d.iters, help="G-Prune propagation steps")
    g.add_argument("--degree", choices=DEGREE_MODES, default=d.degree, help="G-Prune degree counting")
    g.add_argument("--positions", choices=POSITION_MODES, default=d.positions, help="position ids of kept tokens")
    g.add_argument("--layer", type=int, default=None, help="in-LLM methods: ALVTS's first selecting layer l0, "
                   "FastV/DART's pruning layer K (default: 12 for alvts, 0 for alvts --selector paper, 2 for "
                   "fastv/dart)")  # fmt: skip
    g.add_argument("--rank", type=int, default=d.rank, help="ALVTS data-free selector rank (default: %(default)s)")
    g.add_argument("--query", choices=QUERY_SETS, default=d.query, help="ALVTS query set (default: %(default)s)")
    g.add_argument("--skip", choices=SKIP_MODES, default=d.skip, help="ALVTS skipped tokens: full, or kv "
                   "(still give keys/values) (default: %(default)s)")  # fmt: skip
    g.add_argument("--budget", choices=BUDGET_MODES, default=d.budget, help="ALVTS per-layer budget: constant "
                   "k, or flops (matched to keeping --keep tokens in every layer) (default: %(default)s)")  # fmt: skip
    g.add_argument("--selector", choices=SELECTOR_KINDS, default=d.selector, help="ALVTS selector: lowrank "
                   "(RoPE-free proxy) or exact (recomputed attention rows) (default: %(default)s)")  # fmt: skip
    g.add_argument("--factors", type=Path, help="ALVTS calibrated selector factors ('vtprune calib alvts' output)")
    g.add_argument("--prune-seed", type=seed, default=d.seed, help="random: seed of the kept tokens (default: 0)")


def prune_config(args: argparse.Namespace) -> PruneConfig:
    keep = parse_keep(args.keep) if args.keep is not None else None
    method = args.method or ("gprune" if keep is not None else "none")
    factors = str(args.factors) if args.factors is not None else None
    return PruneConfig(
        method=method, keep=keep, theta=args.theta, tau=args.tau, iters=args.iters, degree=args.degree,
        positions=args.positions, layer=args.layer, rank=args.rank, query=args.query, skip=args.skip,
        budget=args.budget, selector=args.selector, factors=factors, seed=args.prune_seed,
    )  # fmt: skip
