"""``vtprune eval``: easy-vqa accuracy under pruning. Wire it into ``vtprune.cli`` with
``add_eval_command(sub)`` in ``build_parser`` and ``COMMANDS["eval"] = cmd_eval``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vtprune.cliargs import add_prune_args, count, new_tokens, prune_config, seed
from vtprune.eval.data import SPLITS
from vtprune.eval.harness import DEFAULT_MAX_NEW_TOKENS

EVAL_FORMAT = "vtprune-eval"


def add_eval_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand (model, pruning and data flags) to the ``vtprune`` subparsers."""
    p = subparsers.add_parser("eval", help="easy-vqa exact-match accuracy with greedy decoding, under pruning")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="pocket", help="pocket | tiny-llava | ... | checkpoint DIR (default: pocket)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="model weights dtype")
    g.add_argument("--cache-dir", type=Path, help="where built-in models are written (default ~/.cache/vtprune)")
    g.add_argument("--device", default="cpu", help="where PyTorch runs: cpu | cuda | cuda:N (default: cpu)")
    add_prune_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--split", default="test", choices=SPLITS, help="easy-vqa split (default: test)")
    d.add_argument("--limit", type=count(1), help="questions drawn at random with --seed (default: the whole split)")
    d.add_argument("--seed", type=seed, default=0, help="subsampling seed (default: 0)")
    d.add_argument("--max-new-tokens", type=new_tokens, default=DEFAULT_MAX_NEW_TOKENS,
                   help="greedy answer length limit")
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, metavar="OUT", help="write the full result (with per-question records) here")
    o.add_argument("--force", action="store_true", help="replace an existing --json result of vtprune eval")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    from vtprune import outputs
    from vtprune.errors import InputError
    from vtprune.eval.harness import run_eval

    if args.json is not None:  # refused before the run, not after it
        outputs.check_file_target(args.json, EVAL_FORMAT, args.force, InputError)
    result = run_eval(
        args.model, prune_config(args), args.split, args.limit, args.seed, args.cache_dir,
        progress=not args.no_progress, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
        device=args.device,
    )  # fmt: skip
    if args.json is not None:
        outputs.write_json_atomic(args.json, {"format": EVAL_FORMAT} | result, InputError)
    print(format_summary(result))
    return 0


def format_summary(r: dict[str, Any]) -> str:
    """A few human-readable lines from a ``run_eval`` result."""
    prune, t, f, tok = r["prune"], r["time"], r["flops"], r["tokens"]
    budget = "" if prune["keep"] is None else f" --keep {prune['keep']}"
    by_type = ", ".join(
        f"{name} {v['accuracy']:.3f} ({v['correct']}/{v['n']})" for name, v in r["by_type"].items() if v["n"]
    )
    lines = [
        f"easy-vqa {r['split']}: accuracy {r['accuracy']:.3f} ({r['correct']}/{r['n']}); {by_type}",
        f"model: {r['model']} ({r['model_info']['family']}); method: {prune['method']}{budget}; "
        f"unparsed answers: {r['unparsed']}",
        f"visual tokens kept: {tok['visual_tokens_kept']:.0f} / {tok['visual_tokens_total']:.0f}; "
        f"prefill tokens: {tok['prefill_tokens']:.0f} / {tok['prompt_tokens']:.0f}",
        f"prefill GFLOPs per question: {f['prefill_gflops_pruned']:.2f} vs {f['prefill_gflops_unpruned']:.2f} "
        f"unpruned (net saved {100 * f['saved_fraction']:.1f}%)",
        f"wall time: {t['wall_s']:.1f} s ({t['per_question_ms_mean']:.0f} ms per question)",
    ]
    if "layer_visual_tokens" in tok:  # in-LLM methods
        runs, counts = [], [round(v) for v in tok["layer_visual_tokens"]]
        for c in counts:
            runs = runs[:-1] + [(c, runs[-1][1] + 1)] if runs and runs[-1][0] == c else runs + [(c, 1)]
        per_layer = ", ".join(f"{c} x{n}" for c, n in runs)
        gf = f.get("layer_gflops", [])
        lines.append(f"visual tokens per decoder layer: {per_layer}; layer GFLOPs {min(gf):.2f}..{max(gf):.2f}")
    if "warning" in r["model_info"]:
        lines.append(f"WARNING: {r['model_info']['warning']}")
    return "\n".join(lines)
