"""``vtprune calib alvts``: fit calibrated ALVTS selector factors and print the per-layer recall table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_calib_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``calib`` (with its ``alvts`` subcommand) to the ``vtprune`` subparsers."""
    from vtprune.calib.config import MODES, CalibConfig
    from vtprune.cliargs import count, seed
    from vtprune.config import QUERY_SETS

    d = CalibConfig()
    p = subparsers.add_parser("calib", help="offline calibration (ALVTS selector factors)")
    sub = p.add_subparsers(dest="calib_method", required=True, parser_class=type(p))
    a = sub.add_parser("alvts", help="fit whitened low-rank ALVTS selectors; writes factors + a recall card")
    a.add_argument("--model", default="pocket", help="pocket | tiny-* | checkpoint DIR (default: pocket)")
    a.add_argument("--cache-dir", type=Path, help="where built-in models are written (default ~/.cache/vtprune)")
    a.add_argument("--data", default="easy-vqa", help="easy-vqa (train split) or a DIR of images "
                   "[+ questions.json: file name -> question] (default: easy-vqa)")  # fmt: skip
    a.add_argument("--n", type=count(1, 1000000), default=d.n, help="calibration pairs (default: %(default)s)")
    a.add_argument("--heldout", type=float, default=d.heldout, help="fraction held out to pick ranks "
                   "(default: %(default)s)")  # fmt: skip
    a.add_argument("--keep", type=int, default=d.k, help="budget k that recall@k is measured at (default: %(default)s)")
    a.add_argument("--query", choices=QUERY_SETS, default=d.query, help="query set (default: %(default)s)")
    a.add_argument("--gamma", type=float, default=d.gamma, help="recall@k target per layer (default: %(default)s)")
    a.add_argument("--seed", type=seed, default=d.seed, help="pair sampling seed (default: %(default)s)")
    a.add_argument("--mode", choices=MODES, default=d.mode, help="whitened: whitened truncated SVD of the "
                   "low-rank selector, rank by recall (ALGORITHMS.md §2.3); paper: the paper's W_Q/W_K factors "
                   "tuned by regression to the full-rank score (§2.1b; use with --selector paper) "
                   "(default: %(default)s)")  # fmt: skip
    a.add_argument("--rank", type=count(1, 100000), default=d.rank, help="--mode paper: selector rank R "
                   "(default: %(default)s)")  # fmt: skip
    a.add_argument("--steps", type=count(0, 1000000), default=d.steps, help="--mode paper: Adam steps per layer "
                   "(default: %(default)s)")  # fmt: skip
    a.add_argument("--batch", type=count(1, 100000), default=d.batch, help="--mode paper: pairs per step "
                   "(default: %(default)s)")  # fmt: skip
    a.add_argument("--lr", type=float, default=d.lr, help="--mode paper: Adam learning rate (default: %(default)s)")
    a.add_argument("--out", required=True, type=Path, help="output directory (factors.safetensors + card.json)")
    a.add_argument("--force", action="store_true", help="replace an existing --out")
    a.add_argument("--json", action="store_true", help="print the card as JSON instead of the table")
    return p


def cmd_calib(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vtprune import outputs
    from vtprune.calib.alvts import calibrate, calibrate_paper, calibration_pairs, format_card, format_paper_card
    from vtprune.calib.config import CalibConfig
    from vtprune.errors import InputError
    from vtprune.models import load_vlm
    from vtprune.prune.factors import save_factors

    cfg = CalibConfig(n=args.n, heldout=args.heldout, k=args.keep, query=args.query, gamma=args.gamma, seed=args.seed,
                      mode=args.mode, rank=args.rank, steps=args.steps, batch=args.batch, lr=args.lr)  # fmt: skip
    outputs.check_target(args.out, "factors", args.force, InputError)  # before the model loads
    adapter = load_vlm(args.model, cache_dir=args.cache_dir)
    pairs = calibration_pairs(args.data, cfg.n, cfg.seed)

    def bar(items: Any, unit: str = "pair") -> Any:
        desc = "calibration" if unit == "pair" else "fitting"
        return tqdm(items, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    paper = cfg.mode == "paper"
    selectors, card = (calibrate_paper if paper else calibrate)(adapter, pairs, cfg, bar)
    card["data"] = args.data
    save_factors(selectors, card, args.out, args.force)
    print(json.dumps(card, indent=2) if args.json else (format_paper_card if paper else format_card)(card))
    print(f"vtprune calib: wrote {args.out}", file=sys.stderr)
    return 0
