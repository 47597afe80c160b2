"""``vtprune`` command line: a thin shell over the library API.

Every user error becomes one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from vtprune import __version__
from vtprune.config import DEGREE_MODES, METHODS, POSITION_MODES, PruneConfig, parse_keep
from vtprune.errors import VtpruneError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="tiny-llava | tiny-llava-next | tiny-qwen2.5-vl | checkpoint DIR")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="model weights dtype")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickle (.bin) weights; only if you trust them")
    g.add_argument("--cache-dir", type=Path, help="where built-in tiny models are written (default ~/.cache/vtprune)")


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning")
    g.add_argument("--method", choices=METHODS, help="pruning method (default: gprune if --keep is given, else none)")
    g.add_argument("--keep", type=str, help="visual tokens kept: a count K (e.g. 64) or a ratio (0.25 or 25%%)")
    d = PruneConfig()
    g.add_argument("--theta", type=float, default=d.theta, help="G-Prune cosine edge threshold")
    g.add_argument("--tau", type=float, default=d.tau, help="G-Prune softmax temperature")
    g.add_argument("--iters", type=int, default=d.iters, help="G-Prune propagation steps")
    g.add_argument("--degree", choices=DEGREE_MODES, default=d.degree, help="G-Prune degree counting")
    g.add_argument("--positions", choices=POSITION_MODES, default=d.positions, help="position ids of kept tokens")


def prune_config(args: argparse.Namespace) -> PruneConfig:
    keep = parse_keep(args.keep) if args.keep is not None else None
    method = args.method or ("gprune" if keep is not None else "none")
    return PruneConfig(method, keep, args.theta, args.tau, args.iters, args.degree, args.positions)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vtprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vtprune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="answer a prompt about an image with pruned visual tokens (PyTorch)")
    _add_model_args(run)
    run.add_argument("--image", required=True, type=Path, help="image file (PNG, JPEG, ...)")
    run.add_argument("--prompt", required=True, help="the question; wrapped in the model's chat template")
    run.add_argument("--raw-prompt", action="store_true", help="use --prompt verbatim; it must hold the image slot")
    run.add_argument("--max-new-tokens", type=int, default=32, help="greedy decoding length limit")
    run.add_argument("--json", action="store_true", help="print the result as JSON instead of text")
    _add_prune_args(run)

    demo = sub.add_parser("demo", help="end-to-end demo on the embedded default (CPU, PyTorch)")
    demo.add_argument("--model", default="tiny-llava-next", help="model to demo (default: tiny-llava-next)")
    demo.add_argument("--image", type=Path, help="image file (default: a generated scene)")
    demo.add_argument("--prompt", default="what shape is in the image ?", help="the question")
    demo.add_argument("--keep", default="0.25", help="G-Prune budget (count or ratio)")
    demo.add_argument("--cache-dir", type=Path, help="where built-in tiny models are written")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from vtprune.models import load_vlm
    from vtprune.runtime.images import load_image
    from vtprune.runtime.pipeline import PrunedVlm

    if args.max_new_tokens < 1:
        raise VtpruneError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    cfg = prune_config(args)
    adapter = load_vlm(args.model, args.dtype, args.allow_pickle, args.cache_dir)
    image = load_image(args.image, adapter.min_image_side)
    result = PrunedVlm(adapter, cfg).generate(image, args.prompt, args.max_new_tokens, args.raw_prompt)
    if args.json:
        print(json.dumps({"model": str(args.model), "family": adapter.family} | result.to_dict(), indent=2))
    else:
        print(format_result(str(args.model), adapter.family, result))
    return 0


def format_result(model: str, family: str, r: Any) -> str:
    f = r.flops
    stages = " | ".join(f"{k} {v:.1f}" for k, v in r.timings_ms.items())
    budget = "" if r.keep is None else f" (--keep {r.keep})"
    return "\n".join([
        f"answer: {r.answer}",
        f"model: {model} ({family}); method: {r.method}{budget}",
        f"visual tokens kept: {r.visual_tokens_kept} / {r.visual_tokens_total}; "
        f"prefill tokens: {r.prefill_tokens} / {r.prompt_tokens}",
        f"prefill GMACs: {f.prefill_macs_pruned / 1e9:.4g} pruned vs {f.prefill_macs_unpruned / 1e9:.4g} unpruned; "
        f"pruning stage {f.prune_stage_macs / 1e9:.3g}; saved {100 * f.saved_fraction:.1f}%",
        f"stage ms: {stages} | total {sum(r.timings_ms.values()):.1f} ({len(r.token_ids)} new tokens)",
    ])  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> int:
    from vtprune.demo import run_demo

    return run_demo(args.model, args.image, args.prompt, parse_keep(args.keep), args.cache_dir)


COMMANDS = {"run": cmd_run, "demo": cmd_demo}


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.debug:
            _quiet_libraries()
        return COMMANDS[args.command](args)
    except VtpruneError as exc:
        if args.debug:
            raise
        print(f"vtprune: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("vtprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
