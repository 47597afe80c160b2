"""Accuracy / FLOPs / latency sweep: every pruning method x budget on the pocket VLM, easy-vqa test split.

    python benchmarks/sweep.py [--limit 100] [--seed 0] [--budgets 128,64,32,16] [--methods all]
                               [--out benchmarks/results/pocket/sweep] [--only METHOD:K] [--render]
                               [--shard I/N] [--merge]

Each cell answers the same ``--limit`` questions (drawn with ``--seed``) greedily in PyTorch on this
machine and records exact-match accuracy by generation and by likelihood (the most likely of the 13
answers, from the same prefill) with 95% Wilson intervals, prefill MACs (pruned, unpruned,
selection stage), median per-stage wall times and TTFT, and a digest of the visual tokens kept for the
first questions (so a re-run of one cell, ``--only gprune:64``, can be checked for identical choices;
``--only`` on a cell the committed sweep.json lacks, e.g. a newly added method, runs it and adds it).
The unpruned model is the 256-token cell of every method. Writes sweep.json, sweep.md and, with
matplotlib, accuracy_vs_budget.png, accuracy_vs_ttft.png and accuracy_vs_flops.png. ONNX Runtime and
GPU latencies are not part of this sweep (see benchmarks/results/pocket/ort-cpu for ORT timings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from vtprune import methods
from vtprune.config import PruneConfig
from vtprune.eval.data import load_questions, subsample
from vtprune.eval.harness import evaluate
from vtprune.models import load_vlm
from vtprune.runtime.report import environment

# Method variants in the sweep: name -> PruneConfig fields besides the budget (each method's registered
# ``variants``, so a newly registered method is in the sweep).
VARIANTS: dict[str, dict[str, Any]] = {
    label: {"method": m.name} | fields for m in methods.all_methods() for label, fields in m.variants.items()
}
# Position-id variants for the diagnosis of early pruning (docs/benchmarks.md): the kept tokens renumbered
# 0..n-1 instead of keeping the original ids.
VARIANTS |= {f"{m}-contiguous": {"method": m, "positions": "contiguous"} for m in ("random", "pool", "gprune")}
DIGEST_QUESTIONS = 5


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))


def kept_digest(adapter: Any, cfg: PruneConfig, questions: list) -> str:
    """sha256 over the visual tokens kept (pre-LLM) or each layer's selection (in-LLM) for a few questions."""
    from PIL import Image

    from vtprune.runtime.pipeline import PrunedVlm

    pipe, h = PrunedVlm(adapter, cfg), hashlib.sha256()
    for q in questions[:DIGEST_QUESTIONS]:
        prefill = pipe.build_prefill(pipe.inputs(Image.open(q.image_path).convert("RGB"), q.question))
        if cfg.in_llm:
            pipe.layerwise_prefill(prefill, pipe.new_cache())
            for layer, ids in sorted(pipe.last_trace.selected.items()):
                h.update(f"{layer}:{ids.tolist()};".encode())
        else:
            h.update(str(prefill.visual_keep.tolist()).encode())
    return h.hexdigest()


def run_cell(adapter: Any, name: str, keep: int | None, questions: list) -> dict[str, Any]:
    fields = VARIANTS[name] if keep is not None else {"method": "none"}
    cfg = PruneConfig(keep=keep, **fields)
    r = evaluate(adapter, questions, cfg, progress=False, likelihood=True)
    lo, hi = wilson(r["correct"], r["n"])
    lik = r["likelihood"]
    stages = r["time"]["stage_ms_median"]
    return {
        "variant": name, "keep": keep, "prune": cfg.to_dict(), "n": r["n"], "correct": r["correct"],
        "accuracy": r["accuracy"], "ci95": [lo, hi],
        "likelihood": lik | {"ci95": list(wilson(lik["correct"], lik["n"]))},
        "by_type": r["by_type"], "unparsed": r["unparsed"],
        "tokens": r["tokens"], "flops": r["flops"], "stage_ms_median": stages,
        "ttft_ms_median": sum(v for k, v in stages.items() if k != "decode"),
        "per_question_ms_median": r["time"]["per_question_ms_median"],
        "kept_digest": kept_digest(adapter, cfg, questions),
    }  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    env, s = result["environment"], result["settings"]
    base = result["unpruned"]["accuracy"]
    lines = [
        "# Pruning sweep: pocket VLM on easy-vqa",
        "",
        f"{s['limit']} test questions (seed {s['seed']}), greedy, PyTorch fp32 ({s.get('backend', 'torch-cpu')}); "
        "accuracy by generation (the first answer word of the greedy reply) and by likelihood (the most likely "
        "of the 13 answers, from the same prefill); "
        f"one run, medians per cell. Machine: {env.get('cpu')}, {env.get('cores')} cores"
        f"{'; GPU ' + env['gpu'] if env.get('gpu') else ''}; torch {env.get('libraries', {}).get('torch')}.",
        "",
        f"Unpruned (256 visual tokens): accuracy {base:.2f} "
        f"[{result['unpruned']['ci95'][0]:.2f}, {result['unpruned']['ci95'][1]:.2f}], "
        f"TTFT {result['unpruned']['ttft_ms_median']:.0f} ms.",
        "",
        *([] if result.get("complete", True) else ["**Partial run**: the sweep stopped before every cell ran.", ""]),
        *([f"Cells ran in {env['shards']} processes side by side (`--shard`), one thread each: TTFT and prefill ms "
           "are single-thread times on a busy machine, comparable within this table only; reference latencies "
           "are the ONNX Runtime tables in docs/benchmarks.md.", ""] if env.get("shards") else []),
        "| method | kept | accuracy (generation) | 95% CI | retained | accuracy (likelihood) | 95% CI | "
        "prefill GFLOPs | net FLOPs saved | TTFT ms | prefill ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in [result["unpruned"] | {"variant": "none"}, *result["cells"]]:
        f, lik = c["flops"], c.get("likelihood") or {}
        lik_cols = (f"{lik['accuracy']:.2f} | {lik['ci95'][0]:.2f}–{lik['ci95'][1]:.2f}" if lik.get("n")
                    else "– | –")  # fmt: skip
        lines.append(
            f"| {c['variant']} | {c['keep'] or 'all'} | {c['accuracy']:.2f} | {c['ci95'][0]:.2f}–{c['ci95'][1]:.2f} | "
            f"{100 * c['accuracy'] / base:.0f}% | {lik_cols} | {f['prefill_gflops_pruned']:.2f} | "
            f"{100 * f['saved_fraction']:.0f}% | "
            f"{c['ttft_ms_median']:.0f} | {c['stage_ms_median'].get('prefill', float('nan')):.0f} |"
        )
    cells = [result["unpruned"] | {"variant": "none"}, *result["cells"]]
    if any((c.get("likelihood") or {}).get("n") for c in cells):
        lines += ["", "By question type, generation / likelihood (chance by likelihood: shape 1/3, color 1/8, yes/no "
                  "1/2); `unparsed`: replies with no answer word.", "",
                  "| method | kept | shape | color | yes/no | unparsed |", "|---|---|---|---|---|---|"]  # fmt: skip
        for c in cells:
            by = c["by_type"]
            cols = " | ".join(f"{by[t]['accuracy']:.2f} / {by[t]['likelihood']['accuracy']:.2f}" if by[t]["n"]
                              else "–" for t in ("shape", "color", "yes/no"))  # fmt: skip
            lines.append(f"| {c['variant']} | {c['keep'] or 'all'} | {cols} | {c['unparsed']} |")
    added = [f"{a['cell']} ({a['environment'].get('load_avg', ['?'])[0]})" for a in result.get("added_cells", [])]
    if added:
        lines += ["", f"Cells added later with `--only` ran on the same questions in later sessions (1-minute load "
                  f"average when each finished, 2 cores: {', '.join(added)}): their accuracy and FLOPs compare; their "
                  "TTFT and prefill ms compare only where the load was near 1 (the cell itself)."]  # fmt: skip
    lines += ["", *[f"Relabelled: {r}" for r in result.get("relabelled", [])]]
    lines += ["", "In-LLM methods (fastv, dart, alvts) keep `kept` visual tokens from their selection layer on "
              "(layers below it see all 256), so their prefill FLOPs are higher than a pre-LLM method's at the "
              "same `kept`; compare them on the accuracy-vs-FLOPs plot.", ""]  # fmt: skip
    return "\n".join(lines)


def plots(result: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    base = result["unpruned"]
    for fname, xkey, xlabel in (
        ("accuracy_vs_budget.png", lambda c: c["keep"], "visual tokens kept"),
        ("accuracy_vs_ttft.png", lambda c: c["ttft_ms_median"], "TTFT, ms (median, PyTorch CPU)"),
        ("accuracy_vs_flops.png", lambda c: c["flops"]["prefill_gflops_pruned"], "prefill GFLOPs"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in VARIANTS:
            cells = sorted((c for c in result["cells"] if c["variant"] == name), key=xkey)
            if cells:
                line = ax.plot([xkey(c) for c in cells], [c["accuracy"] for c in cells], marker="o", label=name)[0]
                lik = [(xkey(c), c["likelihood"]["accuracy"]) for c in cells if (c.get("likelihood") or {}).get("n")]
                if lik and fname == "accuracy_vs_budget.png":  # dashed: the same cells scored by likelihood
                    ax.plot(*zip(*lik, strict=True), linestyle="--", color=line.get_color(), linewidth=1)
        ax.axhline(base["accuracy"], color="k", linestyle="--", linewidth=1, label="unpruned")
        if fname == "accuracy_vs_budget.png":
            ax.set_xscale("log", base=2)
        ylabel = "easy-vqa accuracy (solid: generation, dashed: likelihood)" if fname == "accuracy_vs_budget.png" \
            else "easy-vqa accuracy (generation)"  # fmt: skip
        ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.legend(fontsize=7), ax.grid(alpha=0.3)
        ax.set_title(f"pocket VLM, {result['settings']['limit']} easy-vqa test questions")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


def write(args: argparse.Namespace, budgets: list[int], unpruned: dict[str, Any], cells: list[dict[str, Any]],
          start: float, complete: bool) -> None:
    """Write sweep.json (first, so a run is never lost) and sweep.md after every cell."""
    result = {
        "schema": "vtprune.sweep/1", "complete": complete,
        "settings": {"model": "pocket", "split": "test", "limit": args.limit, "seed": args.seed, "budgets": budgets,
                     "backend": f"torch-{args.device}"},
        "environment": environment(), "unpruned": unpruned, "cells": cells, "wall_s": time.perf_counter() - start,
        "summary": {"median_ttft_ms_unpruned": unpruned["ttft_ms_median"],
                    "retained": {f"{c['variant']}:{c['keep']}": c["accuracy"] / unpruned["accuracy"] for c in cells}},
    }  # fmt: skip
    (args.out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "sweep.md").write_text(markdown(result))


def _load(out: Path) -> dict[str, Any]:
    return json.loads((out / "sweep.json").read_text())


def add_cell(out: Path, cell: dict[str, Any]) -> None:
    """Add a cell the committed sweep lacks (same questions, seed and model) and rewrite sweep.md."""
    result = _load(out)
    cells = result["cells"] + [cell]
    order = {name: i for i, name in enumerate(VARIANTS)}
    result["cells"] = sorted(cells, key=lambda c: (result["settings"]["budgets"].index(c["keep"]),
                                                   order.get(c["variant"], len(order))))  # fmt: skip
    result["summary"]["retained"][f"{cell['variant']}:{cell['keep']}"] = (
        cell["accuracy"] / result["unpruned"]["accuracy"]
    )
    result.setdefault("added_cells", []).append({"cell": f"{cell['variant']}:{cell['keep']}",
                                                 "environment": environment()})  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "sweep.md").write_text(markdown(result))


def run_shard(args: argparse.Namespace, adapter: Any, names: list[str], budgets: list[int], questions: list) -> int:
    """Cells I, I + N, ... of the sweep (the unpruned cell first) into shards/I-of-N.json; ``--merge`` joins
    the shards into sweep.json. Shards run side by side as separate processes (one thread each)."""
    i, n = (int(v) for v in args.shard.split("/"))
    jobs = [("none", None)] + [(name, keep) for keep in budgets for name in names]
    path = args.out / "shards" / f"{i}-of-{n}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, Any] = {"settings": {"limit": args.limit, "seed": args.seed, "budgets": budgets, "names": names,
                                         "backend": f"torch-{args.device}"}, "unpruned": None, "cells": []}  # fmt: skip
    start = time.perf_counter()
    for name, keep in jobs[i::n]:
        cell = run_cell(adapter, name, keep, questions)
        if keep is None:
            done["unpruned"] = cell
        else:
            done["cells"].append(cell)
        done["environment"], done["wall_s"] = environment(), time.perf_counter() - start
        path.write_text(json.dumps(done, indent=2) + "\n")
        print(f"{name}:{keep}: {cell['accuracy']:.3f} / likelihood {cell['likelihood']['accuracy']:.3f} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    return 0


def merge(args: argparse.Namespace) -> int:
    """Join shards/*.json (same settings) into sweep.json and sweep.md."""
    shards = [json.loads(p.read_text()) for p in sorted((args.out / "shards").glob("*.json"))]
    settings = shards[0]["settings"]
    if any(sh["settings"] != settings for sh in shards):
        raise SystemExit("shards were run with different settings")
    unpruned = next(sh["unpruned"] for sh in shards if sh["unpruned"] is not None)
    names, budgets = settings["names"], settings["budgets"]
    cells = sorted((c for sh in shards for c in sh["cells"]),
                   key=lambda c: (budgets.index(c["keep"]), names.index(c["variant"])))  # fmt: skip
    args.limit, args.seed, args.device = settings["limit"], settings["seed"], settings["backend"].split("-", 1)[1]
    write(args, budgets, unpruned, cells, time.perf_counter() - max(sh["wall_s"] for sh in shards),
          complete=len(cells) == len(names) * len(budgets))
    result = _load(args.out)
    result["environment"] = shards[0]["environment"] | {"shards": len(shards), "threads_per_shard": 1}
    (args.out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "sweep.md").write_text(markdown(result))
    print(f"wrote {args.out}/sweep.json, sweep.md, " + ", ".join(plots(result, args.out)), file=sys.stderr)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budgets", default="64,32,128,16")
    p.add_argument("--methods", default="all", help="comma-separated variants (default: all)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pocket/sweep"))
    p.add_argument("--only", help="re-run one cell METHOD:K and compare with the committed sweep.json")
    p.add_argument("--render", action="store_true", help="only rewrite sweep.md and the plots from sweep.json")
    p.add_argument("--device", default="cpu", help="where PyTorch runs: cpu | cuda (timings are that device's)")
    p.add_argument("--cache-dir", type=Path, help="vtprune cache holding the pocket model")
    p.add_argument("--shard", metavar="I/N", help="run every N-th cell from the I-th into shards/I-of-N.json")
    p.add_argument("--merge", action="store_true", help="join shards/*.json into sweep.json and sweep.md")
    args = p.parse_args()
    if args.merge:
        return merge(args)
    if args.render:
        (args.out / "sweep.md").write_text(markdown(_load(args.out)))
        print(", ".join(plots(_load(args.out), args.out)), file=sys.stderr)
        return 0
    questions = subsample(load_questions("test"), args.limit, args.seed)
    adapter = load_vlm("pocket", cache_dir=args.cache_dir, device=args.device)
    if args.only:
        name, keep = args.only.split(":")
        cell = run_cell(adapter, name, int(keep), questions)
        old = next((c for c in _load(args.out)["cells"] if c["variant"] == name and c["keep"] == int(keep)), None)
        if old is None:
            add_cell(args.out, cell)
            print(f"{name}:{keep} accuracy {cell['accuracy']:.3f}; added to {args.out}/sweep.json", file=sys.stderr)
            return 0
        same = (cell["accuracy"], cell["kept_digest"]) == (old["accuracy"], old["kept_digest"])
        print(f"{name}:{keep} accuracy {cell['accuracy']:.3f} (committed {old['accuracy']:.3f}); kept tokens "
              f"{'identical' if cell['kept_digest'] == old['kept_digest'] else 'DIFFERENT'}")  # fmt: skip
        return 0 if same else 1
    names = list(VARIANTS) if args.methods == "all" else args.methods.split(",")
    budgets = [int(b) for b in args.budgets.split(",")]
    if args.shard:
        return run_shard(args, adapter, names, budgets, questions)
    start = time.perf_counter()
    unpruned = run_cell(adapter, "none", None, questions)
    print(f"unpruned: {unpruned['accuracy']:.3f}", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cells: list[dict[str, Any]] = []
    for keep in budgets:  # budget-major: a run cut short still holds every method at the first budgets
        for name in names:
            cells.append(run_cell(adapter, name, keep, questions))
            elapsed = time.perf_counter() - start
            print(f"{name}:{keep}: {cells[-1]['accuracy']:.3f} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
            write(args, budgets, unpruned, cells, start, complete=len(cells) == len(names) * len(budgets))
    print(f"wrote {args.out}/sweep.json, sweep.md, " + ", ".join(plots(_load(args.out), args.out)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
