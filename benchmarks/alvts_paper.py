"""ALVTS with the paper's selector (ALGORITHMS.md §2.1b) against today's default and the baselines, on the
pocket VLM at the paper's three compressions (67 / 78 / 89%: k = 85 / 57 / 28 of 256 visual tokens).

    python benchmarks/alvts_paper.py [--limit 200] [--seed 0] [--keeps 85,57,28] [--rank 64]
                                     [--factors DIR] [--layers 0] [--baselines-at 85,57,28] [--resume]
                                     [--out benchmarks/results/pocket/alvts/paper]

Per k, on the same easy-vqa test questions, greedy, PyTorch eager fp32: the paper's selector
(``--selector paper``: separate rank-R SVD factors of W_Q and W_K, causal attention among all rows, score
= visual-to-visual x text-to-visual attention received) with a budget in every layer (l0 = 0), SVD-only
and, with ``--factors`` (``vtprune calib alvts --mode paper``), calibrated as the paper does; today's
default (``--selector lowrank`` from l0 = 12), and G-Prune, random and DART at the prefill FLOPs of the
paper-selector point (selector and pruning stage included). The unpruned model is measured in the same
run. ``--layers`` sets the paper selector's start layers (default 0; e.g. 0,12 to also compare the two
selectors from the same start). ``--baselines-at`` limits the matched-FLOPs baselines to some budgets;
``--resume`` keeps the rows of an earlier paper.json that this run would measure the same way (same
questions) and measures the rest. Records accuracy with a 95% Wilson interval, retained accuracy, prefill
GFLOPs and their share of the unpruned prefill, and the median prefill stage time (ms, PyTorch CPU).
Writes paper.json and paper.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from vtprune.config import PruneConfig
from vtprune.eval.data import load_questions, subsample
from vtprune.eval.harness import evaluate
from vtprune.flops import layerwise_prefill_macs, prefill_macs, prune_stage_macs
from vtprune.models import load_vlm
from vtprune.runtime.report import environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import wilson  # noqa: E402

PAPER_RETAINED = {85: 0.9960, 57: 0.9877, 28: 0.9673}  # LLaVA-1.5-7B at 67 / 78 / 89% compression


def closest(cost: Callable[[int], float], target: float, n_visual: int) -> int:
    """The budget k in 1..N_v whose prefill GFLOPs come closest to ``target``."""
    return min(range(1, n_visual + 1), key=lambda k: abs(cost(k) - target))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keeps", default="85,57,28")
    p.add_argument("--rank", type=int, default=64, help="paper selector rank R")
    p.add_argument("--factors", help="the paper selector's calibrated factors (vtprune calib alvts --mode paper)")
    p.add_argument("--layers", default="0", help="start layers l0 of the paper selector (default: 0)")
    p.add_argument("--baselines-at", help="budgets k at which G-Prune, random and DART run (default: every k)")
    p.add_argument("--resume", action="store_true", help="keep the rows of --out's paper.json that do not use "
                   "the paper selector (same settings) and measure the others")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pocket/alvts/paper"))
    p.add_argument("--cache-dir", type=Path, help="vtprune cache holding the pocket model")
    args = p.parse_args()
    questions = subsample(load_questions("test"), args.limit, args.seed)
    adapter = load_vlm("pocket", cache_dir=args.cache_dir)
    dims = adapter.text_dims()
    rows: list[dict] = []
    settings = {"limit": args.limit, "seed": args.seed, "split": "test", "rank": args.rank, "factors": args.factors,
                "paper_retained": PAPER_RETAINED, "device": "cpu"}  # fmt: skip
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every row: a long run that stops early keeps what it measured
        (args.out / "paper.json").write_text(json.dumps({"settings": settings, "environment": env, "rows": rows},
                                                        indent=2) + "\n")  # fmt: skip
        (args.out / "paper.md").write_text(markdown(rows, settings, env))

    earlier: dict[str, dict] = {}
    if args.resume and (args.out / "paper.json").is_file():
        old = json.loads((args.out / "paper.json").read_text())
        if (old["settings"]["limit"], old["settings"]["seed"]) == (args.limit, args.seed):
            earlier = {r["variant"]: r for r in old["rows"] if r["prune"]["selector"] != "paper"}

    def run(name: str, cfg: PruneConfig, keep: int | None) -> dict:
        if name in earlier and earlier[name]["prune"] == cfg.to_dict():
            rows.append(earlier[name])
            save()
            print(f"{name}: kept from the earlier run", file=sys.stderr, flush=True)
            return earlier[name]
        r = evaluate(adapter, questions, cfg, progress=False)
        lo, hi = wilson(r["correct"], r["n"])
        gflops = r["flops"]["prefill_gflops_pruned"] + r["flops"]["prune_stage_gflops"]
        row = {"variant": name, "keep": keep, "prune": cfg.to_dict(), "accuracy": r["accuracy"], "ci95": [lo, hi],
               "gflops": gflops, "gflops_unpruned": r["flops"]["prefill_gflops_unpruned"],
               "prefill_ms_median": r["time"]["stage_ms_median"].get("prefill"), "tokens": r["tokens"]}  # fmt: skip
        if rows:
            row["retained"] = r["accuracy"] / rows[0]["accuracy"]
        rows.append(row)
        save()
        print(f"{name}: {r['accuracy']:.3f} at {gflops:.1f} GFLOPs", file=sys.stderr, flush=True)
        return row

    base = run("unpruned", PruneConfig(), None)
    n_visual = round(base["tokens"]["visual_tokens_total"])
    n_text = round(base["tokens"]["prompt_tokens"] - n_visual)

    def gflops_pre(method: str) -> Callable[[int], float]:
        return lambda k: 2 * (prefill_macs(dims, n_text + k)
                              + prune_stage_macs(PruneConfig(method, k), [n_visual], dims.hidden)) / 1e9  # fmt: skip

    def gflops_dart(k: int) -> float:
        rows_ = [n_text + n_visual] * 2 + [n_text + k] * (dims.layers - 2)
        return 2 * layerwise_prefill_macs(dims, rows_) / 1e9

    for keep in (int(k) for k in args.keeps.split(",")):
        paper = None  # the baselines match the FLOPs of the first start layer's point
        for l0 in (int(x) for x in args.layers.split(",")):
            row = run(f"alvts paper l0={l0} k={keep}", PruneConfig("alvts", keep, layer=l0, selector="paper",
                                                                   rank=args.rank), keep)  # fmt: skip
            paper = paper or row
            if args.factors:
                run(f"alvts paper calibrated l0={l0} k={keep}", PruneConfig("alvts", keep, layer=l0, selector="paper",
                                                                           factors=args.factors), keep)  # fmt: skip
        run(f"alvts default (lowrank l0=12) k={keep}", PruneConfig("alvts", keep), keep)
        if args.baselines_at and str(keep) not in args.baselines_at.split(","):
            continue
        for method in ("gprune", "random"):
            k = closest(gflops_pre(method), paper["gflops"], n_visual)
            run(f"{method} K={k} (FLOPs of paper k={keep})", PruneConfig(method, k), keep)
        k = closest(gflops_dart, paper["gflops"], n_visual)
        run(f"dart K=2 k={k} (FLOPs of paper k={keep})", PruneConfig("dart", k), keep)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def markdown(rows: list[dict], settings: dict, env: dict) -> str:
    lines = ["# ALVTS with the paper's selector (pocket VLM, easy-vqa)", "",
             f"{settings['limit']} test questions (seed {settings['seed']}), greedy, PyTorch eager fp32 on the CPU "
             f"({env.get('cpu')}, {env.get('cores')} cores); paper selector rank R = {settings['rank']}: SVD "
             f"initialisation, and calibrated factors {settings['factors'] or '(not measured)'}. The paper's "
             "LLaVA-1.5-7B figures: 99.6 / 98.8 / 96.7% retained at k = 85 / 57 / 28.", "",
             "| variant | accuracy | 95% CI | retained | prefill GFLOPs | of unpruned |", "|---|---|---|---|---|---|"]
    for r in rows:
        ret = f"{r['retained']:.1%}" if "retained" in r else "—"
        share = r["gflops"] / r["gflops_unpruned"]
        lines.append(f"| {r['variant']} | {r['accuracy']:.3f} | {r['ci95'][0]:.2f}–{r['ci95'][1]:.2f} | {ret} | "
                     f"{r['gflops']:.1f} | {share:.0%} |")  # fmt: skip
    lines += ["", "Prefill GFLOPs include the selectors and pruning stages. Wall times are in paper.json only "
              "(PyTorch eager, taken while other jobs shared the machine: not comparable across rows).", "",
              f"Environment: {env.get('os')}, python {env.get('python')}; libraries {env.get('libraries')}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
