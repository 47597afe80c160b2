"""Every pruning method exported and timed in ONNX Runtime on the CPU at one budget (pocket VLM).

    python benchmarks/ort_methods.py [--keep 64] [--alvts-layers 12,16] [--num-images 4] [--warmup 2]
                                     [--iters 8] [--new-tokens 16] [--work-dir DIR]
                                     [--out benchmarks/results/pocket/ort-methods]

Exports one bundle per method (pre-LLM methods reuse the unpruned bundle's embed/decoder graphs; in-LLM
methods get their routed prefill + decode graphs; every export is validated against PyTorch), then times
them one after another in this process on the same easy-vqa images with ``vtprune bench``'s measuring
code (warm-up, timed runs, p50 per stage). Writes ort_methods.json and ort_methods.md with the
environment; accuracy at the same budget is read from the committed sweep when present.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vtprune.api import export_bundle
from vtprune.bench.config import BenchConfig, Budget
from vtprune.bench.run import bench_budget, budget_entry, ensure_bundle
from vtprune.bench.targets import OrtTarget
from vtprune.bench.workload import load_samples
from vtprune.config import PruneConfig
from vtprune.export.bundle import ExportConfig
from vtprune.manifest import MANIFEST
from vtprune.runtime.report import environment

SWEEP = Path("benchmarks/results/pocket/sweep/sweep.json")


def configs(keep: int, alvts_layers: list[int]) -> dict[str, PruneConfig]:
    return {
        "none": PruneConfig(),
        **{m: PruneConfig(m, keep) for m in ("gprune", "random", "uniform", "divprune", "visionzip")},
        "fastv": PruneConfig("fastv", keep), "dart": PruneConfig("dart", keep),
        **{f"alvts l0={l0}": PruneConfig("alvts", keep, layer=l0) for l0 in alvts_layers},
    }  # fmt: skip


def bundle_for(name: str, cfg: PruneConfig, work: Path, unpruned: Path | None, bench: BenchConfig) -> Path:
    path = work / name.replace(" ", "_").replace("=", "")
    if cfg.pre_llm and unpruned is not None and not (path / MANIFEST).is_file():
        export_bundle("pocket", cfg, ExportConfig(reuse_lm_from=str(unpruned)), path, log=_log)
        return path
    return ensure_bundle("pocket", cfg, path, bench, _log)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def accuracy_at(name: str, cfg: PruneConfig) -> float | None:
    """Accuracy of this exact config at this budget in the committed method sweep (same model and questions).

    Only sweep.json: the ALVTS variant table (alvts/variants.json) was measured with an earlier projector."""
    want = cfg.to_dict()
    found = []
    if SWEEP.exists():
        sweep = json.loads(SWEEP.read_text())
        found += [c for c in [sweep["unpruned"], *sweep["cells"]] if c["prune"] == want]
    return found[0]["accuracy"] if found else None


def markdown(rows: list[dict], settings: dict, env: dict) -> str:
    base = rows[0]["stages"]
    lines = [f"# ONNX Runtime CPU latency per method at K = {settings['keep']} (pocket VLM)", "",
             f"{settings['num_images']} easy-vqa test images, {settings['new_tokens']} new tokens, "
             f"{settings['warmup']} warm-up + {settings['iters']} timed runs per method, p50; one process, "
             "methods one after another. Accuracy: the committed sweeps (100 questions, PyTorch).", "",
             "| method | visual tokens (fewest per layer) | prefill GFLOPs | vision+prune ms | prefill ms | TTFT ms "
             "| TTFT vs unpruned | decode ms/token | accuracy |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        s = r["stages"]
        acc = "—" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        lines.append(
            f"| {r['name']} | {r['tokens']['visual_kept']} | {r['flops']['prefill_flops'] / 1e9:.1f} | "
            f"{s['vision_prune']['p50_ms']:.0f} | {s['prefill']['p50_ms']:.0f} | {s['ttft']['p50_ms']:.0f} | "
            f"{s['ttft']['p50_ms'] / base['ttft']['p50_ms']:.2f} | {s['decode_per_token']['p50_ms']:.1f} | {acc} |"
        )
    lines += ["", f"Environment: {env.get('cpu')}, {env.get('cores')} cores, {env.get('os')}; "
              f"libraries {env.get('libraries')}; ORT providers {env.get('ort_providers')}.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--alvts-layers", default="12,16", help="ALVTS start layers l0 (comma-separated)")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache/vtprune/bench/ort-methods")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pocket/ort-methods"))
    p.add_argument("--export-only", action="store_true", help="write (or check) the bundles and stop")
    p.add_argument("--render", action="store_true", help="only refresh the accuracy column from the committed "
                   "sweeps and rewrite ort_methods.json/.md (latencies untouched)")  # fmt: skip
    args = p.parse_args()
    if args.render:
        result = json.loads((args.out / "ort_methods.json").read_text())
        for row in result["methods"]:
            row["accuracy"] = accuracy_at(row["name"], PruneConfig(**row["prune"]))
        (args.out / "ort_methods.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (args.out / "ort_methods.md").write_text(markdown(result["methods"], result["settings"], result["environment"]))
        return 0
    bench = BenchConfig(model="pocket", budgets=(Budget(args.keep),), dataset="easy-vqa", num_images=args.num_images,
                        new_tokens=args.new_tokens,
                        warmup=args.warmup, iters=args.iters, no_progress=True)  # fmt: skip
    args.work_dir.mkdir(parents=True, exist_ok=True)
    cfgs = configs(args.keep, [int(v) for v in args.alvts_layers.split(",")])
    bundles, unpruned = {}, None
    for name, cfg in cfgs.items():  # every export first, so timing runs back to back
        bundles[name] = bundle_for(name, cfg, args.work_dir, unpruned, bench)
        unpruned = unpruned or bundles[name]
    if args.export_only:
        return 0
    samples = load_samples(None, "easy-vqa", bench.prompt, args.num_images)
    rows = []
    for name, cfg in cfgs.items():
        target = OrtTarget(bundles[name])
        measured = bench_budget(target, samples, bench, lambda: None)
        entry = budget_entry(Budget(cfg.keep if cfg.prunes else None), target, measured, "process")
        rows.append({"name": name, **entry, "accuracy": accuracy_at(name, cfg)})
        target.close()
        _log(f"{name}: TTFT {entry['stages']['ttft']['p50_ms']:.0f} ms")
    settings = {"keep": args.keep, "num_images": args.num_images, "warmup": args.warmup, "iters": args.iters,
                "new_tokens": args.new_tokens, "provider": "cpu", "threads": "default"}  # fmt: skip
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort_methods.json").write_text(json.dumps({"settings": settings, "environment": env,
                                                           "methods": rows}, indent=2, default=str) + "\n")  # fmt: skip
    (args.out / "ort_methods.md").write_text(markdown(rows, settings, env))
    _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
