"""Quantized bundles on the pocket VLM: fp32 vs int8 / int4 weights vs w8a8 (int8 weights and activations)
in the language model (``vtprune export --weights``), unpruned and pruned, in ONNX Runtime on the CPU:
bundle size, TTFT, decode speed and easy-vqa accuracy, each format beside fp32 with the same method.

    python benchmarks/quantized.py [--questions 200] [--rounds 5] [--out benchmarks/results/pocket/quantized]

Latency: rounds alternate the bundles (A, B, C, A, B, C, ...), each round answers the same 4 easy-vqa images
with up to 16 new tokens, 1 warm-up round; medians over rounds and ratios against fp32 come from this one
run. Accuracy: the same ``--questions`` easy-vqa test questions (seed 0) for every bundle, greedy, 4 tokens.
Writes quantized.json and quantized.md with the environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

FORMATS = ("fp32", "int8", "int4", "w8a8")
METHODS = {"none": {"method": "none"}, "gprune-64": {"method": "gprune", "keep": 64},
           "alvts-28": {"method": "alvts", "keep": 28}}  # fmt: skip


def bundle_for(work: Path, fmt: str, name: str, log: Any) -> Path:
    """The pocket bundle of ``fmt`` and method ``name`` (exported once into ``work``, reused after)."""
    from vtprune.api import export_bundle
    from vtprune.config import PruneConfig
    from vtprune.export.bundle import ExportConfig

    out = work / f"{name}-{fmt}"
    if not (out / "manifest.json").is_file():
        log(f"exporting {out.name}")
        weights = None if fmt == "fp32" else fmt
        export_bundle("pocket", PruneConfig(**METHODS[name]), ExportConfig(weights=weights), out)
    return out


def accuracy(vlm: Any, questions: list, images: Any) -> dict[str, Any]:
    from vtprune.eval.scoring import normalize_answer

    correct = [normalize_answer(vlm.generate(images.get(q), q.question, 4).answer) == q.answer for q in questions]
    return {"n": len(correct), "accuracy": sum(correct) / len(correct)}


def latency_rounds(vlms: dict[str, Any], images: list, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per bundle, per round: median TTFT (ms) and decode tokens/s over the round's images."""
    out = {k: {"ttft_ms": [], "decode_tok_s": []} for k in vlms}
    for r in range(rounds + 1):
        for key, vlm in vlms.items():
            gens = [vlm.generate(img, "describe the image in detail.", 16) for img in images]
            if r == 0:
                continue  # warm-up round
            out[key]["ttft_ms"].append(statistics.median(g.ttft_ms for g in gens))
            out[key]["decode_tok_s"].append(statistics.median(g.decode_tokens_per_s for g in gens))
    return out


def main() -> None:
    import sys

    from vtprune.backends.ort import OrtVlm
    from vtprune.eval.data import load_questions, subsample
    from vtprune.eval.harness import _ImageCache
    from vtprune.manifest import read_manifest
    from vtprune.runtime.report import environment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path(".bench/quantized"), help="where the bundles are exported")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pocket/quantized"))
    args = ap.parse_args()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    bundles = {f"{m}/{f}": bundle_for(args.work, f, m, log) for m in METHODS for f in FORMATS}
    questions = subsample(load_questions("test"), args.questions, 0)
    vlms = {k: OrtVlm(b) for k, b in bundles.items()}
    cache = _ImageCache(vlms["none/fp32"].adapter.min_image_side)
    images = [cache.get(q) for q in list({q.image_path: q for q in questions}.values())[:4]]
    log("latency rounds")
    lat = latency_rounds(vlms, images, args.rounds)
    rows, result = {}, {"date": time.strftime("%Y-%m-%d"), "environment": environment(),
                         "questions": args.questions, "rounds": args.rounds, "rows": {}}  # fmt: skip
    for key, vlm in vlms.items():  # results are written after every bundle, so a long run can be cut short
        log(f"accuracy {key}")
        size = sum(p.stat().st_size for p in bundles[key].glob("*.onnx"))
        validation = read_manifest(bundles[key])["validation"]["checks"]
        rows[key] = {"bundle_mb": size / 2**20, "ttft_ms": statistics.median(lat[key]["ttft_ms"]),
                     "decode_tok_s": statistics.median(lat[key]["decode_tok_s"]), "rounds": lat[key],
                     **accuracy(vlm, questions, cache), "validation": validation}  # fmt: skip
        base = rows[key.split("/")[0] + "/fp32"]
        rows[key] |= {"size_vs_fp32": rows[key]["bundle_mb"] / base["bundle_mb"],
                      "ttft_vs_fp32": rows[key]["ttft_ms"] / base["ttft_ms"],
                      "decode_vs_fp32": rows[key]["decode_tok_s"] / base["decode_tok_s"]}  # fmt: skip
        result["rows"] = rows
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quantized.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "quantized.md").write_text(to_markdown(result))
    print(to_markdown(result))


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# Pocket VLM: fp32 vs int8 / int4 weights vs w8a8 in the language model, ONNX Runtime CPU", "",
             f"{result['date']}; {env['cpu']}, {env['cores']} cores, ONNX Runtime "
             f"{env['libraries'].get('onnxruntime', '?')}; 1-minute load {env['load_avg']}. Latency: medians of "
             f"{result['rounds']} alternating rounds (4 easy-vqa images, up to 16 new tokens); accuracy: "
             f"{result['questions']} easy-vqa test questions (seed 0), greedy.", "",
             "| method | weights | bundle MB | vs fp32 | TTFT ms | vs fp32 | decode tok/s | vs fp32 | accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in result["rows"].items():
        method, fmt = key.split("/")
        lines.append(f"| {method} | {fmt} | {r['bundle_mb']:.0f} | {r['size_vs_fp32']:.2f} | {r['ttft_ms']:.0f} | "
                     f"{r['ttft_vs_fp32']:.2f} | {r['decode_tok_s']:.1f} | {r['decode_vs_fp32']:.2f} | "
                     f"{r['accuracy']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
