"""TensorRT engines of the pocket VLM's decoder: fp32 against ``--weights int4-trt`` (int4 weights as
blocked Q/DQ, written on the checkpoint's own GGUF grid), built with TensorRT for RTX on this machine's CPU.

    python benchmarks/trt_lm_int4.py [--target sm89] [--out benchmarks/results/pocket/trt-lm-int4]

Exports G-Prune 64 bundles both ways (validated against PyTorch in ONNX Runtime), builds each decoder
engine, and records graph and engine sizes, build times and the int4 bundle's validation; nothing here runs
an engine (no machine here can). Writes trt_lm_int4.json and trt_lm_int4.md with the environment.
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
    ap.add_argument("--work", type=Path, default=Path(".bench/trt-vision"), help="where the bundles are exported")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pocket/trt-lm-int4"))
    args = ap.parse_args()
    rows = {}
    for label, weights in (("fp32", None), ("int4-trt", "int4-trt")):
        bundle = args.work / f"gprune-64-{label}"
        if not (bundle / "manifest.json").is_file():
            export_bundle("pocket", PruneConfig(method="gprune", keep=64), ExportConfig(weights=weights), bundle)
        start = time.perf_counter()
        engines = build_bundle(bundle, BuildConfig(graphs=("decoder",), target=args.target, force=True))
        m = read_manifest(bundle)
        onnx_bytes = sum((bundle / f).stat().st_size for f in m["graphs"]["decoder"]["files"])
        rows[label] = {"onnx_mb": onnx_bytes / 2**20, "engine_mb": engines["decoder"]["engine_size"] / 2**20,
                       "build_s": time.perf_counter() - start, "engine": engines["decoder"],
                       "quantization": m["graphs"]["decoder"].get("quantization"),
                       "validation": m["validation"]["checks"]}  # fmt: skip
    result = {"date": time.strftime("%Y-%m-%d"), "environment": environment(), "target": args.target, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trt_lm_int4.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    env = result["environment"]
    lines = ["# Pocket VLM decoder engine: fp32 against int4 Q/DQ weights, TensorRT for RTX", "",
             f"{result['date']}; built on {env['cpu']}, {env['cores']} cores (no GPU: TensorRT-RTX builds on the "
             f"CPU), target {args.target}; G-Prune 64 bundles, decoder graph only (prefill and decode, KV cache). "
             "Engines were built, not run. Validation: the bundle's decoder in ONNX Runtime against PyTorch.", "",
             "| decoder | ONNX MB | engine MB | build s | next-token KL to PyTorch fp32 | greedy agreement (32) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in rows.items():
        checks = {c["check"]: c for c in r["validation"]}
        logits = checks.get("prefill logits", {})
        greedy = next((c for name, c in checks.items() if name.startswith("greedy")), {})
        kl, agreement = logits.get("kl", float("nan")), greedy.get("agreement", float("nan"))
        lines.append(f"| {label} | {r['onnx_mb']:.1f} | {r['engine_mb']:.1f} | {r['build_s']:.1f} | "
                     f"{kl:.4f} | {agreement:.3f} |")  # fmt: skip
    (args.out / "trt_lm_int4.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
