"""TensorRT engines of the pocket VLM's vision graph: fp32 against ``--vision int8-trt`` (symmetric int8 Q/DQ,
static scales calibrated on 32 easy-vqa train images), built with TensorRT for RTX on this machine's CPU.

    python benchmarks/trt_vision_int8.py [--target sm89] [--out benchmarks/results/pocket/trt-vision-int8]

Exports G-Prune 64 bundles both ways (validated against PyTorch), builds each vision engine, and records
graph and engine sizes and build times; nothing here runs an engine (no machine here can). Writes
trt_vision_int8.json and trt_vision_int8.md with the environment.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    from vtprune.api import export_bundle
    from vtprune.backends.trt.engines import BuildConfig, build_bundle
    from vtprune.config import PruneConfig
    from vtprune.export.bundle import ExportConfig
    from vtprune.manifest import read_manifest
    from vtprune.runtime.report import environment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="sm89", help="TensorRT-RTX compute capability to build for")
    ap.add_argument("--work", type=Path, default=Path(".bench/trt-vision"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pocket/trt-vision-int8"))
    args = ap.parse_args()
    rows = {}
    for label, vision in (("fp32", None), ("int8-trt", "int8-trt")):
        bundle = args.work / f"gprune-64-{label}"
        if not (bundle / "manifest.json").is_file():
            export_bundle("pocket", PruneConfig(method="gprune", keep=64), ExportConfig(vision=vision), bundle)
        start = time.perf_counter()
        engines = build_bundle(bundle, BuildConfig(graphs=("vision",), target=args.target, force=True))
        m = read_manifest(bundle)
        rows[label] = {"onnx_mb": (bundle / "vision.onnx").stat().st_size / 2**20,
                       "engine_mb": engines["vision"]["engine_size"] / 2**20,
                       "build_s": time.perf_counter() - start, "engine": engines["vision"],
                       "validation": m["validation"]["checks"]}  # fmt: skip
    result = {"date": time.strftime("%Y-%m-%d"), "environment": environment(), "target": args.target, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trt_vision_int8.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    env = result["environment"]
    lines = ["# Pocket VLM vision engine: fp32 against int8 Q/DQ, TensorRT for RTX", "",
             f"{result['date']}; built on {env['cpu']}, {env['cores']} cores (no GPU: TensorRT-RTX builds on the "
             f"CPU), target {args.target}; G-Prune 64 bundles, vision graph only. Engines were built, not run. "
             "Engine precision is the build's float precision; Q/DQ layers compute in int8 where the graph puts "
             "them (the pruning stage, attention products and norms stay fp32).", "",
             "| vision graph | ONNX MB | engine MB | build s | engine precision |",
             "|---|---|---|---|---|"]  # fmt: skip
    for label, r in rows.items():
        lines.append(f"| {label} | {r['onnx_mb']:.1f} | {r['engine_mb']:.1f} | {r['build_s']:.1f} | "
                     f"{r['engine'].get('precision', '?')} |")  # fmt: skip
    (args.out / "trt_vision_int8.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
