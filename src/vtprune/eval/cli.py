"""``vtprune eval``: accuracy under pruning on easy-vqa or a local data set, by generation and by likelihood,
for a checkpoint in PyTorch or a bundle on ONNX Runtime / TensorRT (what is deployed). Wire it into
``vtprune.cli`` with ``add_eval_command(sub)`` in ``build_parser`` and ``COMMANDS["eval"] = cmd_eval``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vtprune.cliargs import add_prune_args, count, new_tokens, prune_config, seed, threads
from vtprune.eval.data import SPLITS
from vtprune.eval.harness import DEFAULT_MAX_NEW_TOKENS

EVAL_FORMAT = "vtprune-eval"
# settings a resumed run must share with the file it continues
RESUME_KEYS = ("model", "backend", "dtype", "data", "split", "limit", "seed", "prune", "max_new_tokens",
               "likelihood_scoring")


def add_eval_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand (model, pruning, data and output flags) to the ``vtprune`` subparsers."""
    p = subparsers.add_parser(
        "eval", help="accuracy under pruning on easy-vqa or your own data (JSONL, datasets folder, parquet), "
        "by generation and by likelihood; a checkpoint in PyTorch or a bundle")  # fmt: skip
    p.add_argument("bundle", nargs="?", type=Path,
                   help="a bundle directory to evaluate as deployed (ONNX Runtime; --backend trt for engines)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="PyTorch: pocket | tiny-llava | ... | checkpoint DIR (default: pocket)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="PyTorch weights dtype")
    g.add_argument("--cache-dir", type=Path, help="where built-in models are written (default ~/.cache/vtprune)")
    g.add_argument("--device", help="PyTorch device: cpu | cuda | cuda:N (default: cpu)")
    g.add_argument("--backend", choices=("ort", "trt"), default="ort", help="bundle: ONNX Runtime or TensorRT engines")
    g.add_argument("--provider", default="cpu", help="bundle: ONNX Runtime provider cpu | cuda | tensorrt")
    g.add_argument("--threads", type=threads, help="bundle: ONNX Runtime intra-op threads (default: all cores)")
    add_prune_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--data", type=Path, metavar="PATH", help="a JSONL file, a datasets folder (save_to_disk) or "
                   "parquet file(s); docs/evaluation.md (default: easy-vqa --split)")  # fmt: skip
    d.add_argument("--columns", metavar="F=COL,...", help="datasets/parquet: column of each field (image, "
                   "question, answers, options, type, id) where the names differ")  # fmt: skip
    d.add_argument("--split", default="test", choices=SPLITS, help="easy-vqa split (default: test)")
    d.add_argument("--limit", type=count(1), help="questions drawn at random with --seed (default: all)")
    d.add_argument("--seed", type=seed, default=0, help="subsampling seed (default: 0)")
    d.add_argument("--max-new-tokens", type=new_tokens, default=None,
                   help=f"greedy answer length limit (default: {DEFAULT_MAX_NEW_TOKENS} on easy-vqa, 16 otherwise)")
    d.add_argument("--no-likelihood", action="store_true", help="generation only: do not score closed answer "
                   "sets (options, yes/no, easy-vqa's answers) by log-likelihood")  # fmt: skip
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, metavar="OUT", help="write the full result (with per-question records) "
                   "here; written every 10 questions while running, so --resume can continue it")  # fmt: skip
    o.add_argument("--resume", action="store_true", help="continue the --json result of an interrupted run with "
                   "the same settings (its questions are not asked again)")  # fmt: skip
    o.add_argument("--items", type=Path, metavar="OUT.jsonl", help="also write one JSON line per question "
                   "(to compare two runs question by question)")  # fmt: skip
    o.add_argument("--force", action="store_true", help="replace an existing --json / --items output of vtprune eval")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    from vtprune import outputs
    from vtprune.api import open_runner
    from vtprune.errors import ConfigError, InputError
    from vtprune.eval.data import load_data, load_easy_vqa, parse_columns
    from vtprune.eval.harness import data_settings, evaluate_runner

    if args.bundle is not None:
        if args.model or args.method or args.keep:
            raise ConfigError("a bundle's model and pruning are fixed at export; drop --model/--method/--keep")
        if args.device or args.dtype != "fp32":
            raise ConfigError("--device and --dtype are for --model (PyTorch); a bundle's device is --provider")
        source, backend, prune = args.bundle, args.backend, None
    else:
        if args.backend != "ort" or args.provider != "cpu" or args.threads:
            raise ConfigError("--backend, --provider and --threads are for a bundle; --model runs PyTorch")
        source, backend, prune = args.model or "pocket", "torch", prune_config(args)
    if args.resume and args.json is None:
        raise ConfigError("--resume continues a --json result; give --json OUT")
    earlier = _resumable(args.json) if args.resume else None
    if args.json is not None and earlier is None:
        outputs.check_file_target(args.json, EVAL_FORMAT, args.force, InputError)  # refused before the run
    if args.items is not None:
        _check_items_target(args.items, args.force)
    data = (load_data(args.data, args.limit, args.seed, parse_columns(args.columns)) if args.data is not None
            else load_easy_vqa(args.split, args.limit, args.seed))  # fmt: skip
    max_new = args.max_new_tokens or (DEFAULT_MAX_NEW_TOKENS if data.kind == "easy-vqa" else 16)
    likelihood = not args.no_likelihood
    with open_runner(source, backend, provider=args.provider, threads=args.threads, prune=prune, dtype=args.dtype,
                     device=args.device or "cpu", cache_dir=args.cache_dir) as runner:  # fmt: skip
        settings = {"format": EVAL_FORMAT, "model": str(source), "backend": _backend_label(backend, args.provider),
                    "dtype": args.dtype} | data_settings(data, args.limit, args.seed) | {  # fmt: skip
            "prune": runner.cfg.to_dict(), "max_new_tokens": max_new, "likelihood_scoring": likelihood}
        prior = _matching_items(earlier, settings, args.json) if earlier is not None else []

        def checkpoint(records: list[dict[str, Any]]) -> None:
            if args.json is not None:
                outputs.write_json_atomic(args.json, settings | {"complete": False, "items": records}, InputError)

        result = evaluate_runner(runner, data, max_new, not args.no_progress, likelihood=likelihood,
                                 done=prior, checkpoint=checkpoint)  # fmt: skip
    result = settings | {"complete": True} | result
    if args.json is not None:
        outputs.write_json_atomic(args.json, result, InputError)
    if args.items is not None:
        lines = "".join(json.dumps(r) + "\n" for r in result["items"])
        outputs.write_file_atomic(args.items, lines.encode())
    print(format_summary(result))
    return 0


def _backend_label(backend: str, provider: str) -> str:
    return {"torch": "pytorch", "trt": "tensorrt"}.get(backend, f"onnxruntime-{provider}")


def _resumable(path: Path) -> dict[str, Any] | None:
    """The result in ``path`` to continue (None when there is no file yet)."""
    from vtprune.errors import InputError

    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"--resume: cannot read {path} ({exc}); remove it or choose another --json") from None
    if not (isinstance(data, dict) and data.get("format") == EVAL_FORMAT and isinstance(data.get("items"), list)):
        raise InputError(f"--resume: {path} is not a vtprune eval result")
    return data


def _matching_items(earlier: dict[str, Any], settings: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """The records of an earlier run of ``path``, refused when it ran with other settings."""
    from vtprune.errors import InputError

    differ = [k for k in RESUME_KEYS if earlier.get(k) != settings.get(k)]
    if differ:
        raise InputError(f"--resume: {path} was run with other settings ({', '.join(differ)}); "
                         "use another --json, or --force without --resume to start over")  # fmt: skip
    return list(earlier["items"])


def _check_items_target(path: Path, force: bool) -> None:
    from vtprune import outputs
    from vtprune.errors import InputError

    if path.exists() and force and path.is_file():
        first = path.read_text(errors="replace").split("\n", 1)[0]
        try:
            record = json.loads(first)
        except ValueError:
            record = None
        ours = isinstance(record, dict) and "key" in record
        if not ours:
            raise InputError(f"{path} exists and is not a vtprune eval --items file; choose another path")
        return
    outputs.check_file_target(path, EVAL_FORMAT, False, InputError)


def format_summary(r: dict[str, Any]) -> str:
    """A few human-readable lines from an eval result."""
    prune, t, f, tok = r["prune"], r["time"], r["flops"], r["tokens"]
    budget = "" if prune["keep"] is None else f" --keep {prune['keep']}"

    def acc(v: dict[str, Any]) -> str:
        text = f"{v['accuracy']:.3f} ({v['correct']}/{v['n']})"
        if v.get("vqa_accuracy") is not None:
            text += f", VQA {v['vqa_accuracy']:.3f}"
        lik = v.get("likelihood") or {}
        if lik.get("n"):
            text += f", likelihood {lik['accuracy']:.3f} ({lik['correct']}/{lik['n']})"
        return text

    by_type = "; ".join(f"{name} {acc(v)}" for name, v in r["by_type"].items() if v["n"])
    lines = [
        f"{r['data']}: accuracy {acc(r)}",
        f"by type: {by_type}",
        f"model: {r['model']} ({r['model_info']['family']}, {r['backend']}); method: {prune['method']}{budget}; "
        f"unparsed answers: {r['unparsed']}" + (f"; resumed {r['resumed']} answered questions" if r["resumed"] else ""),
    ]
    if tok:
        lines.append(f"visual tokens kept: {tok['visual_tokens_kept']:.0f} / {tok['visual_tokens_total']:.0f}; "
                     f"prefill tokens: {tok['prefill_tokens']:.0f} / {tok['prompt_tokens']:.0f}")  # fmt: skip
    if f:
        saved = 100 * f["saved_fraction"]
        lines.append(f"prefill GFLOPs per question: {f['prefill_gflops_pruned']:.2f} vs "
                     f"{f['prefill_gflops_unpruned']:.2f} unpruned (net saved {saved:.1f}%)")  # fmt: skip
    if t.get("per_question_ms_mean") is not None:
        lines.append(f"wall time: {t['wall_s']:.1f} s ({t['per_question_ms_mean']:.0f} ms per question)")
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
