"""TensorRT engines of the pocket VLM's decoder in each Q/DQ format vtprune writes for TensorRT: fp32 against
``--weights int4-trt`` (int4 weights, blocked, on the checkpoint's own GGUF grid) and ``int8-trt``
(SmoothQuant, int8 weights per channel and static int8 activations), built with TensorRT for RTX on this
machine's CPU.

    python benchmarks/trt_lm.py [--formats fp32,int4-trt,int8-trt] [--target sm89] [--questions 200]
                                [--out benchmarks/results/pocket/trt-lm]

Exports G-Prune 64 bundles (validated against PyTorch in ONNX Runtime), builds each decoder engine, and
records graph and engine sizes, build times, each bundle's validation and its easy-vqa accuracy in ONNX
Runtime (the same Q/DQ arithmetic as the graph TensorRT builds, rounded on the CPU; ``--questions`` test
questions, seed 0, greedy). Nothing here runs an engine (no machine here can). Writes trt_lm.json and
trt_lm.md with the environment.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FORMATS = ("fp32", "int4-trt", "int8-trt")


def main() -> None:
    from quantized import accuracy  # benchmarks/quantized.py: the same easy-vqa scoring

    from vtprune.api import export_bundle
    from vtprune.backends.ort import OrtVlm
    from vtprune.backends.trt.engines import BuildConfig, build_bundle
    from vtprune.config import PruneConfig
    from vtprune.eval.data import load_questions, subsample
    from vtprune.export.bundle import ExportConfig
    from vtprune.manifest import read_manifest
    from vtprune.runtime.report import environment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(FORMATS), help="fp32 first")
    ap.add_argument("--target", default="sm89", help="TensorRT-RTX compute capability to build for")
    ap.add_argument("--questions", type=int, default=200, help="easy-vqa test questions per format (0: none)")
    ap.add_argument("--work", type=Path, default=Path(".bench/trt-lm"), help="where the bundles are exported")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pocket/trt-lm"))
    args = ap.parse_args()
    questions = subsample(load_questions("test"), args.questions, 0) if args.questions else []
    rows = {}
    for label in args.formats.split(","):
        bundle = args.work / f"gprune-64-{label}"
        if not (bundle / "manifest.json").is_file():
            weights = None if label == "fp32" else label
            export_bundle("pocket", PruneConfig(method="gprune", keep=64), ExportConfig(weights=weights), bundle)
        start = time.perf_counter()
        engines = build_bundle(bundle, BuildConfig(graphs=("decoder",), target=args.target, force=True))
        m = read_manifest(bundle)
        onnx_bytes = sum((bundle / f).stat().st_size for f in m["graphs"]["decoder"]["files"])
        rows[label] = {"onnx_mb": onnx_bytes / 2**20, "engine_mb": engines["decoder"]["engine_size"] / 2**20,
                       "build_s": time.perf_counter() - start, "engine": engines["decoder"],
                       "quantization": m["graphs"]["decoder"].get("quantization"),
                       "validation": m["validation"]["checks"]}  # fmt: skip
        if questions:
            vlm = OrtVlm(bundle)
            rows[label] |= accuracy(vlm, questions)
            vlm.close()
    result = {"date": time.strftime("%Y-%m-%d"), "environment": environment(), "target": args.target,
              "questions": len(questions), "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trt_lm.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    env = result["environment"]
    lines = ["# Pocket VLM decoder engines: fp32 against TensorRT's Q/DQ formats, TensorRT for RTX", "",
             f"{result['date']}; built on {env['cpu']}, {env['cores']} cores (no GPU: TensorRT-RTX builds on the "
             f"CPU), target {args.target}; G-Prune 64 bundles, decoder graph only (prefill and decode, KV cache). "
             "Engines were built, not run. Validation: the bundle's decoder in ONNX Runtime against PyTorch; "
             f"accuracy: the bundle in ONNX Runtime on {len(questions)} easy-vqa test questions (seed 0), greedy.",
             "", "| decoder | ONNX MB | engine MB | build s | next-token KL to PyTorch fp32 | greedy agreement (32) "
             "| accuracy (generation) | accuracy (likelihood) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in rows.items():
        checks = {c["check"]: c for c in r["validation"]}
        logits = checks.get("prefill logits", {})
        greedy = next((c for name, c in checks.items() if name.startswith("greedy")), {})
        kl, agreement = logits.get("kl", float("nan")), greedy.get("agreement", float("nan"))
        acc = (f"{r['accuracy']:.3f} | {r['likelihood_accuracy']:.3f}" if "accuracy" in r else "– | –")
        lines.append(f"| {label} | {r['onnx_mb']:.1f} | {r['engine_mb']:.1f} | {r['build_s']:.1f} | "
                     f"{kl:.4f} | {agreement:.3f} | {acc} |")  # fmt: skip
    (args.out / "trt_lm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
