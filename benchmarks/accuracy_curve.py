"""Unpruned accuracy and the G-Prune accuracy curve of the pocket VLM on a whole easy-vqa split.

    python benchmarks/accuracy_curve.py [--split test] [--limit N] [--seed 0] [--budgets 128,64,32,16]
                                        [--method gprune] [--device cuda] [--workers 4]
                                        [--out benchmarks/results/pocket/accuracy]

Every cell answers the same questions (the whole split unless ``--limit``) through the product's own
harness (``vtprune.eval.harness.evaluate``: ``PrunedVlm`` greedy, exact match after normalisation),
split round-robin over ``--workers`` processes that each hold the model on ``--device``; the split is a
throughput device only: each question's answer does not depend on which worker ran it. A re-run with the
same settings keeps the cells already in curve.json. Writes curve.json
(settings, environment, per cell: accuracy with a 95% Wilson interval, per-type tallies, token budget,
prefill FLOPs, wall time, and the per-question correctness as a bit string in question order) and curve.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from sweep import wilson  # noqa: E402

from vtprune.config import PruneConfig  # noqa: E402
from vtprune.eval.data import load_questions, subsample  # noqa: E402
from vtprune.eval.scoring import summarize  # noqa: E402
from vtprune.runtime.report import environment  # noqa: E402

_WORKER: dict[str, Any] = {}


def _init_worker(cache_dir: str | None, device: str, threads: int | None = None) -> None:
    import torch

    from vtprune.models import load_vlm

    if threads:  # workers share the cores: without this each takes them all and they thrash
        torch.set_num_threads(threads)
    _WORKER["adapter"] = load_vlm("pocket", cache_dir=cache_dir, device=device)


def _run_shard(task: tuple[dict[str, Any], str, int | None, int, list[int]]) -> dict[str, Any]:
    from vtprune.eval.harness import evaluate

    cfg, split, limit, seed, positions = task
    questions = subsample(load_questions(split), limit, seed)
    r = evaluate(_WORKER["adapter"], [questions[i] for i in positions], PruneConfig(**cfg), progress=False)
    return {"items": r["items"], "tokens": r["tokens"], "flops": r["flops"], "n": r["n"],
            "model_info": r["model_info"]}  # fmt: skip


def _weighted(parts: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Question-weighted mean of each shard's per-question means (lists element-wise)."""
    total = sum(p["n"] for p in parts)
    out: dict[str, Any] = {}
    for name, value in parts[0][key].items():
        if isinstance(value, list):
            out[name] = [sum(p["n"] * p[key][name][i] for p in parts) / total for i in range(len(value))]
        else:
            out[name] = sum(p["n"] * p[key][name] for p in parts) / total
    return out


def run_cell(pool: Any, cfg: PruneConfig, args: argparse.Namespace, n: int) -> dict[str, Any]:
    shards = [list(range(w, n, args.workers)) for w in range(args.workers)]
    tasks = [(cfg.to_dict(), args.split, args.limit, args.seed, s) for s in shards if s]
    start = time.perf_counter()
    parts = pool.map(_run_shard, tasks) if pool is not None else [_run_shard(t) for t in tasks]
    wall = time.perf_counter() - start
    items = sorted((i for p in parts for i in p["items"]), key=lambda r: r["index"])
    flops = _weighted(parts, "flops")
    flops["saved_fraction"] = 1 - (flops["prefill_gflops_pruned"] + flops["prune_stage_gflops"]) / flops[
        "prefill_gflops_unpruned"]  # fmt: skip
    scored = summarize(items)
    bits = "".join("1" if r["correct"] else "0" for r in items)
    return {
        "prune": cfg.to_dict(), **scored, "ci95": list(wilson(scored["correct"], scored["n"])),
        "tokens": _weighted(parts, "tokens"), "flops": flops, "wall_s": wall,
        "questions_per_s": len(items) / wall, "correct_bits": f"{int(bits, 2):x}" if bits else "",
        "model_info": parts[0]["model_info"],
    }  # fmt: skip


def _finished_cells(path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Cells of an earlier run with the same settings (a re-run continues where it was stopped)."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if {k: v for k, v in old["settings"].items() if k != "workers"} != {
            k: v for k, v in settings.items() if k != "workers"}:  # fmt: skip
        return {}
    return {json.dumps(c["prune"], sort_keys=True): c for c in old["cells"]}


def markdown(result: dict[str, Any]) -> str:
    s, env, cells = result["settings"], result["environment"], result["cells"]
    base = cells[0]
    drawn = "all" if s["limit"] is None else f"drawn with seed {s['seed']}"
    where = f"{s['device']}" + (f" ({env['gpu']})" if env.get("gpu") and s["device"].startswith("cuda") else "")
    lines = [
        "# Pocket VLM accuracy on easy-vqa, unpruned and under G-Prune",
        "",
        f"Split `{s['split']}`: {base['n']} questions ({drawn}), "
        f"greedy (`vtprune eval`'s harness), PyTorch fp32 on {where}, {s['workers']} worker processes; one run. "
        f"Projector: {base['model_info'].get('pocket_projector', {}).get('sha256', '?')[:12]}. "
        f"Machine: {env.get('cpu')}, {env.get('cores')} cores; torch {env.get('libraries', {}).get('torch')}.",
        "",
        "| method | visual tokens kept | accuracy | 95% CI | retained | shape | color | yes/no | prefill GFLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        t = {k: "—" if v["accuracy"] is None else f"{v['accuracy']:.3f}" for k, v in c["by_type"].items()}
        lines.append(
            f"| {c['prune']['method']} | {c['tokens']['visual_tokens_kept']:.0f} | {c['accuracy']:.3f} | "
            f"{c['ci95'][0]:.3f}–{c['ci95'][1]:.3f} | {100 * c['accuracy'] / base['accuracy']:.1f}% | "
            f"{t.get('shape', '—')} | {t.get('color', '—')} | {t.get('yes/no', '—')} | "
            f"{c['flops']['prefill_gflops_pruned'] + c['flops']['prune_stage_gflops']:.1f} |"
        )
    lines += ["", "Retained = accuracy / unpruned accuracy. G-Prune at K = 256 keeps every token (the unpruned "
              "row). `correct_bits` in curve.json lists each question's outcome in question order.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=int, help="questions drawn with --seed (default: the whole split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budgets", default="128,64,32,16", help="comma-separated K; empty for the unpruned cell only")
    p.add_argument("--method", default="gprune", help="the pruning method of the curve (pre-LLM or in-LLM)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--workers", type=int, default=1, help="processes, each holding the model")
    p.add_argument("--cache-dir", type=Path, help="vtprune cache holding the pocket model")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "pocket" / "accuracy")
    args = p.parse_args()
    if args.workers < 1:
        p.error("--workers must be at least 1")
    from vtprune.models import pocket, torch_device

    torch_device(args.device)  # refuse a device this machine lacks before any work
    pocket.materialize(args.cache_dir)  # build the cache once, before the workers load it
    n = len(subsample(load_questions(args.split), args.limit, args.seed))
    budgets = [int(b) for b in args.budgets.split(",") if b]
    configs = [PruneConfig()] + [PruneConfig(method=args.method, keep=k) for k in budgets]
    pool = None
    if args.workers > 1:
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // args.workers)
        pool = mp.get_context("spawn").Pool(args.workers, _init_worker, (args.cache_dir, args.device, threads))
    else:
        _init_worker(args.cache_dir, args.device)
    settings = {"model": "pocket", "split": args.split, "limit": args.limit, "seed": args.seed,
                "device": args.device, "workers": args.workers, "method": args.method, "budgets": budgets}  # fmt: skip
    result: dict[str, Any] = {"schema": "vtprune.accuracy-curve/1", "settings": settings,
                              "environment": environment(), "cells": []}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    done = _finished_cells(args.out / "curve.json", settings)
    try:
        for cfg in configs:
            cell = done.get(json.dumps(cfg.to_dict(), sort_keys=True)) or run_cell(pool, cfg, args, n)
            result["cells"].append(cell)
            print(f"{cfg.method} keep={cfg.keep}: accuracy {cell['accuracy']:.4f} on {cell['n']} "
                  f"({cell['questions_per_s']:.1f} q/s)", file=sys.stderr, flush=True)  # fmt: skip
            result["complete"] = len(result["cells"]) == len(configs)
            (args.out / "curve.json").write_text(json.dumps(result, indent=1) + "\n")
            (args.out / "curve.md").write_text(markdown(result))
    finally:
        if pool is not None:
            pool.close()
    print(f"wrote {args.out}/curve.json and curve.md; median cell wall "
          f"{statistics.median(c['wall_s'] for c in result['cells']):.0f} s", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
