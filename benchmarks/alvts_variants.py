"""ALVTS variants on the pocket VLM: which of the reconstruction's switches matters (ALGORITHMS.md §2).

    python benchmarks/alvts_variants.py [--limit 100] [--keep 64] [--factors DIR]
                                        [--out benchmarks/results/pocket/alvts]

Every variant answers the same easy-vqa test questions (seeded) greedily in PyTorch; FastV at the same
budget is the reference point. Writes variants.json and variants.md (accuracy, 95% Wilson interval,
prefill GFLOPs, the environment).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vtprune.config import PruneConfig
from vtprune.eval.data import load_questions, subsample
from vtprune.eval.harness import evaluate
from vtprune.models import load_vlm
from vtprune.runtime.report import environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import wilson  # noqa: E402


def variants(keep: int, factors: str | None) -> dict[str, PruneConfig]:
    out = {
        "alvts l0=2 (ALGORITHMS.md's proposal)": PruneConfig("alvts", keep, layer=2),
        "alvts l0=2 query=instruction": PruneConfig("alvts", keep, layer=2, query="instruction"),
        "alvts l0=8": PruneConfig("alvts", keep, layer=8),
        "alvts l0=16": PruneConfig("alvts", keep, layer=16),
        "alvts l0=8 exact selector": PruneConfig("alvts", keep, layer=8, selector="exact"),
        "alvts l0=16 skip=kv": PruneConfig("alvts", keep, layer=16, skip="kv"),
        "fastv K=2 (reference)": PruneConfig("fastv", keep),
    }
    if factors:
        out["alvts l0=2 calibrated"] = PruneConfig("alvts", keep, layer=2, factors=factors)
        out["alvts l0=8 calibrated"] = PruneConfig("alvts", keep, layer=8, factors=factors)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--factors", help="calibrated factors directory (vtprune calib alvts)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pocket/alvts"))
    args = p.parse_args()
    questions = subsample(load_questions("test"), args.limit, args.seed)
    adapter = load_vlm("pocket")
    rows = []
    for name, cfg in variants(args.keep, args.factors).items():
        r = evaluate(adapter, questions, cfg, progress=False)
        lo, hi = wilson(r["correct"], r["n"])
        rows.append({"variant": name, "prune": cfg.to_dict(), "accuracy": r["accuracy"], "ci95": [lo, hi],
                     "by_type": r["by_type"], "flops": r["flops"], "tokens": r["tokens"]})  # fmt: skip
        print(f"{name}: {r['accuracy']:.3f}", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"settings": vars(args) | {"out": str(args.out)}, "environment": environment(), "variants": rows}
    (args.out / "variants.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# ALVTS variants, pocket VLM, keep {args.keep} of 256, {args.limit} easy-vqa test questions", "",
             "| variant | accuracy | 95% CI | prefill GFLOPs |", "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lo, hi = r["ci95"]
        gflops = r["flops"]["prefill_gflops_pruned"]
        lines.append(f"| {r['variant']} | {r['accuracy']:.2f} | {lo:.2f}–{hi:.2f} | {gflops:.1f} |")
    (args.out / "variants.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
