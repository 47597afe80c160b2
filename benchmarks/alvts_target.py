"""ALVTS against the paper's headline on the pocket VLM: k = 28 of 256 visual tokens (89% compression).

    python benchmarks/alvts_target.py [--limit 100] [--seed 0] [--keep 28] [--layers 2,8,12,16]
                                      [--factors DIR] [--out benchmarks/results/pocket/alvts/target]

Issue #7's target: retain >= 96.7% of the unpruned accuracy at k = 28 and beat G-Prune at the same
prefill FLOPs. For each ALVTS start layer l0 (data-free selector, r = 64; calibrated factors too with
``--factors``), accuracy and prefill GFLOPs on the same easy-vqa test questions; then G-Prune at the
visual-token count whose prefill GFLOPs (pruning stage included) come closest to that ALVTS point, and
FastV at k. The unpruned model is measured in the same run. Writes target.json, target.md and
accuracy_vs_flops.png (with the committed G-Prune sweep curve when benchmarks/results/pocket/sweep has one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vtprune.config import PruneConfig
from vtprune.eval.data import load_questions, subsample
from vtprune.eval.harness import evaluate
from vtprune.flops import prefill_macs, prune_stage_macs
from vtprune.models import load_vlm
from vtprune.runtime.report import environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import wilson  # noqa: E402

TARGET_RETAINED = 0.967
SWEEP = Path("benchmarks/results/pocket/sweep/sweep.json")


def row(name: str, cfg: PruneConfig, r: dict, unpruned: float | None) -> dict:
    lo, hi = wilson(r["correct"], r["n"])
    out = {"variant": name, "prune": cfg.to_dict(), "accuracy": r["accuracy"], "ci95": [lo, hi],
           "gflops": r["flops"]["prefill_gflops_pruned"] + r["flops"]["prune_stage_gflops"],
           "by_type": r["by_type"], "tokens": r["tokens"]}  # fmt: skip
    if unpruned:
        out["retained"] = r["accuracy"] / unpruned
    return out


def matched_gprune_keep(adapter, gflops: float, n_text: float, n_visual: int) -> int:
    """The G-Prune budget whose mean prefill GFLOPs (stage included) is closest to ``gflops``."""
    dims = adapter.text_dims()

    def cost(k: int) -> float:
        cfg = PruneConfig("gprune", k)
        macs = prefill_macs(dims, round(n_text) + k) + prune_stage_macs(cfg, [n_visual], dims.hidden)
        return 2 * macs / 1e9

    return min(range(1, n_visual + 1), key=lambda k: abs(cost(k) - gflops))


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if SWEEP.exists():
        cells = [c for c in json.loads(SWEEP.read_text())["cells"] if c["variant"] == "gprune"]
        cells.sort(key=lambda c: c["keep"])
        ax.plot([c["flops"]["prefill_gflops_pruned"] + c["flops"]["prune_stage_gflops"] for c in cells],
                [c["accuracy"] for c in cells], "o--", color="grey", label="G-Prune (sweep, K=16..128)")  # fmt: skip
    for group, marker in (("alvts", "s"), ("gprune", "o"), ("fastv", "^"), ("none", "*")):
        pts = [r for r in rows if r["prune"]["method"] == group]
        if pts:
            ax.scatter([r["gflops"] for r in pts], [r["accuracy"] for r in pts], marker=marker, s=60, label=group)
            for r in pts:
                ax.annotate(r["variant"].split(" (")[0], (r["gflops"], r["accuracy"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))  # fmt: skip
    ax.set_xlabel("prefill GFLOPs per question (pruning stage included)")
    ax.set_ylabel("easy-vqa exact-match accuracy")
    ax.set_title("pocket VLM: ALVTS at k=28 vs G-Prune at matched FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_flops.png", dpi=120)


def markdown(rows: list[dict], settings: dict, env: dict) -> str:
    lines = ["# ALVTS at the paper's headline budget (pocket VLM, easy-vqa)", "",
             f"{settings['limit']} test questions (seed {settings['seed']}), greedy, PyTorch eager fp32 on "
             f"{settings.get('device', 'cpu')}{' (' + env['gpu'] + ')' if env.get('gpu') else ''}; "
             f"k = {settings['keep']} visual tokens per routed layer; target: retain >= "
             f"{TARGET_RETAINED:.1%} of the unpruned accuracy and beat G-Prune at equal prefill FLOPs.", "",
             "| variant | accuracy | 95% CI | retained | prefill GFLOPs |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ret = f"{r['retained']:.1%}" if "retained" in r else "—"
        lines.append(f"| {r['variant']} | {r['accuracy']:.2f} | {r['ci95'][0]:.2f}–{r['ci95'][1]:.2f} | {ret} | "
                     f"{r['gflops']:.1f} |")  # fmt: skip
    lines += ["", f"Environment: {env.get('cpu')}, {env.get('cores')} cores, {env.get('os')}, python "
              f"{env.get('python')}; libraries {env.get('libraries')}.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=int, default=28)
    p.add_argument("--layers", default="2,8,12,16", help="ALVTS start layers l0 to measure")
    p.add_argument("--factors", help="calibrated factors directory (vtprune calib alvts)")
    p.add_argument("--unpruned-from", type=Path, help="take the unpruned accuracy from this sweep.json (same "
                   "questions) instead of measuring it again")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pocket/alvts/target"))
    p.add_argument("--device", default="cpu", help="where PyTorch runs: cpu | cuda")
    p.add_argument("--cache-dir", type=Path, help="vtprune cache holding the pocket model")
    args = p.parse_args()
    questions = subsample(load_questions("test"), args.limit, args.seed)
    adapter = load_vlm("pocket", cache_dir=args.cache_dir, device=args.device)

    def run(name: str, cfg: PruneConfig, unpruned: float | None) -> dict:
        r = row(name, cfg, evaluate(adapter, questions, cfg, progress=False), unpruned)
        print(f"{name}: {r['accuracy']:.3f} at {r['gflops']:.1f} GFLOPs", file=sys.stderr, flush=True)
        return r

    if args.unpruned_from:
        sweep = json.loads(args.unpruned_from.read_text())
        if (sweep["settings"]["limit"], sweep["settings"]["seed"]) != (args.limit, args.seed):
            raise SystemExit(f"{args.unpruned_from} was measured on other questions (limit/seed differ)")
        u = sweep["unpruned"]
        base = {"variant": f"unpruned (from {args.unpruned_from})", "prune": PruneConfig().to_dict(),
                "accuracy": u["accuracy"], "ci95": u["ci95"], "tokens": u["tokens"],
                "gflops": u["flops"]["prefill_gflops_pruned"] + u["flops"]["prune_stage_gflops"]}  # fmt: skip
    else:
        base = run("unpruned", PruneConfig(), None)
    unpruned, rows = base["accuracy"], [base]
    alvts = [(f"alvts l0={l0}", PruneConfig("alvts", args.keep, layer=int(l0))) for l0 in args.layers.split(",")]
    if args.factors:
        alvts += [(f"alvts l0={l0} calibrated", PruneConfig("alvts", args.keep, layer=int(l0), factors=args.factors))
                  for l0 in args.layers.split(",")]  # fmt: skip
    for name, cfg in alvts:
        rows.append(run(name, cfg, unpruned))
    n_text = base["tokens"]["prompt_tokens"] - base["tokens"]["visual_tokens_total"]
    n_visual = round(base["tokens"]["visual_tokens_total"])
    for r in [r for r in rows if r["prune"]["method"] == "alvts" and r["prune"]["factors"] is None]:
        k = matched_gprune_keep(adapter, r["gflops"], n_text, n_visual)
        rows.append(run(f"gprune K={k} (FLOPs of {r['variant']})", PruneConfig("gprune", k), unpruned))
    rows.append(run(f"fastv K=2 k={args.keep}", PruneConfig("fastv", args.keep), unpruned))
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"limit": args.limit, "seed": args.seed, "keep": args.keep, "split": "test",
                "target_retained": TARGET_RETAINED, "device": args.device}  # fmt: skip
    env = environment()
    (args.out / "target.json").write_text(json.dumps({"settings": settings, "environment": env, "rows": rows},
                                                     indent=2) + "\n")  # fmt: skip
    (args.out / "target.md").write_text(markdown(rows, settings, env))
    plot(rows, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
