"""Quantized bundles on the pocket VLM: fp32 vs int8 / int4 weights vs w8a8 (int8 weights and activations)
in the language model (``vtprune export --weights``), unpruned and pruned, in ONNX Runtime on the CPU:
bundle size, TTFT, decode speed and easy-vqa accuracy, each format beside fp32 with the same method.

    python benchmarks/quantized.py [--questions 200] [--rounds 5] [--out benchmarks/results/pocket/quantized]
                                   [--formats fp32,int8,int4,w8a8] [--methods none,gprune-64,alvts-28]

A format ``F+v8`` adds ``--vision int8`` (the vision encoder and projector in int8, static scales
calibrated on 32 easy-vqa train images) to the language-model format F, e.g. ``w8a8+v8``; ``F@traced`` and
``F@fused`` export it with ``--decoder traced|fused`` (quantized formats write the fused decoder by default,
fp32 the traced one; for ALVTS the fused graph is the one-token decode graph, its routed prefill traced either
way). ``benchmarks/peers.py`` reads the bundles exported here.

Latency: rounds alternate the bundles (A, B, C, A, B, C, ...), each round answers the same 4 easy-vqa images
with up to 16 new tokens, 1 warm-up round; medians over rounds (TTFT, its vision stage, decode speed) and
ratios against fp32 come from this one run. Accuracy: the same ``--questions`` easy-vqa test questions
(seed 0) for every bundle, greedy, 4 tokens, by generation and by likelihood (``vtprune eval``'s scoring).
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
        base, _, decoder = fmt.partition("@")
        lm, _, vision = base.partition("+")
        weights = None if lm == "fp32" else lm
        export = ExportConfig(weights=weights, vision="int8" if vision == "v8" else None, decoder=decoder or None)
        export_bundle("pocket", PruneConfig(**METHODS[name]), export, out)
    return out


def accuracy(vlm: Any, questions: list) -> dict[str, Any]:
    from vtprune.eval.data import EvalData
    from vtprune.eval.harness import evaluate_runner
    from vtprune.eval.scoring import ANSWERS

    r = evaluate_runner(vlm, EvalData("easy-vqa", "easy-vqa", questions, ANSWERS), 4, progress=False)
    return {"n": r["n"], "accuracy": r["accuracy"], "likelihood_accuracy": r["likelihood"]["accuracy"]}


def latency_rounds(vlms: dict[str, Any], images: list, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per bundle, per round: median TTFT (ms) and decode tokens/s over the round's images."""
    out = {k: {"ttft_ms": [], "vision_ms": [], "decode_tok_s": []} for k in vlms}
    for r in range(rounds + 1):
        for key, vlm in vlms.items():
            gens = [vlm.generate(img, "describe the image in detail.", 16) for img in images]
            if r == 0:
                continue  # warm-up round
            out[key]["ttft_ms"].append(statistics.median(g.ttft_ms for g in gens))
            out[key]["vision_ms"].append(statistics.median(g.timings_ms.get("vision", 0.0) for g in gens))
            out[key]["decode_tok_s"].append(statistics.median(g.decode_tokens_per_s for g in gens))
    return out


def main() -> None:
    import sys

    from vtprune.backends.ort import OrtVlm
    from vtprune.eval.data import load_questions, subsample
    from vtprune.images import load_image
    from vtprune.manifest import read_manifest
    from vtprune.runtime.report import environment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path(".bench/quantized"), help="where the bundles are exported")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pocket/quantized"))
    ap.add_argument("--formats", default=",".join(FORMATS), help="fp32 first; F+v8 adds an int8 vision graph")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    formats, names = args.formats.split(","), args.methods.split(",")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    # F@traced / F@fused: --decoder traced or fused (an in-LLM method's decode graph; its routed prefill is traced)
    bundles = {f"{m}/{f}": bundle_for(args.work, f, m, log) for m in names for f in formats}
    questions = subsample(load_questions("test"), args.questions, 0)
    vlms = {k: OrtVlm(b) for k, b in bundles.items()}
    first = next(iter(vlms.values()))
    images = [load_image(q.image_path, first.adapter.min_image_side)
              for q in list({q.image_path: q for q in questions}.values())[:4]]  # fmt: skip
    log("latency rounds")
    lat = latency_rounds(vlms, images, args.rounds)
    rows, result = {}, {"date": time.strftime("%Y-%m-%d"), "environment": environment(),
                         "questions": args.questions, "rounds": args.rounds, "rows": {}}  # fmt: skip
    for key, vlm in vlms.items():  # results are written after every bundle, so a long run can be cut short
        log(f"accuracy {key}")
        size = sum(p.stat().st_size for p in bundles[key].glob("*.onnx"))
        validation = read_manifest(bundles[key])["validation"]["checks"]
        rows[key] = {"bundle_mb": size / 2**20, "ttft_ms": statistics.median(lat[key]["ttft_ms"]),
                     "vision_ms": statistics.median(lat[key]["vision_ms"]),
                     "decode_tok_s": statistics.median(lat[key]["decode_tok_s"]), "rounds": lat[key],
                     **accuracy(vlm, questions), "validation": validation}  # fmt: skip
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
    lines = ["# Pocket VLM: quantized bundles against fp32, ONNX Runtime CPU", "",
             f"{result['date']}; {env['cpu']}, {env['cores']} cores, ONNX Runtime "
             f"{env['libraries'].get('onnxruntime', '?')}; 1-minute load {env['load_avg']}. Latency: medians of "
             f"{result['rounds']} alternating rounds (4 easy-vqa images, up to 16 new tokens); accuracy: "
             f"{result['questions']} easy-vqa test questions (seed 0), greedy.", "",
             "| method | format | bundle MB | vs fp32 | TTFT ms | vs fp32 | vision ms | decode tok/s | vs fp32 | "
             "accuracy (generation) | accuracy (likelihood) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in result["rows"].items():
        method, fmt = key.split("/")
        lik = "–" if r.get("likelihood_accuracy") is None else f"{r['likelihood_accuracy']:.3f}"
        lines.append(f"| {method} | {fmt} | {r['bundle_mb']:.0f} | {r['size_vs_fp32']:.2f} | {r['ttft_ms']:.0f} | "
                     f"{r['ttft_vs_fp32']:.2f} | {r.get('vision_ms', float('nan')):.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_vs_fp32']:.2f} | {r['accuracy']:.3f} | {lik} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
