"""The ONNX Runtime runner's prefix cache on the pocket VLM: the same bundle with and without it, unpruned and
pruned, fp32 and the speed format (w8a8 + int8 vision), in ONNX Runtime on the CPU.

    python benchmarks/prefix_cache.py [--rounds 7] [--questions 200] [--out benchmarks/results/pocket/prefix-cache]
                                      [--formats fp32,w8a8+v8] [--methods none,gprune-64]

For each bundle, two runners in one process: ``prefix_cache=True`` (the default: the keys and values of the
prompt's text before the image kept from the previous prompt) and ``False`` (every prompt prefilled whole).
Rounds alternate them (A, B, A, B, ...), each round answers the same 4 easy-vqa images with 16 new tokens, 1
warm-up round; medians over rounds of TTFT and of the prefill stage, ratios from this one run. Each runner
also answers ``--questions`` easy-vqa test questions (seed 0; greedy, 4 tokens, by generation and by
likelihood), and the greedy tokens of the latency requests are compared between the two runners.
Bundles are ``benchmarks/quantized.py``'s (exported once into ``--work``). Writes prefix_cache.json and
prefix_cache.md with the environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def rounds(pair: dict[str, Any], images: list, n: int) -> dict[str, Any]:
    """Alternating rounds over ``pair`` (cached, whole): per round, the median TTFT and prefill ms of the images;
    and whether both answered every image with the same tokens."""
    out: dict[str, Any] = {k: {"ttft_ms": [], "prefill_ms": [], "cached_tokens": [], "prefill_tokens": []}
                           for k in pair}  # fmt: skip
    tokens: dict[str, list] = {k: [] for k in pair}
    for r in range(n + 1):
        for key, vlm in pair.items():
            gens = [vlm.generate(img, "describe the image in detail.", 16) for img in images]
            tokens[key] = [g.token_ids for g in gens]
            if r == 0:
                continue  # warm-up round (fills the cache)
            out[key]["ttft_ms"].append(statistics.median(g.ttft_ms for g in gens))
            out[key]["prefill_ms"].append(statistics.median(g.timings_ms["prefill"] for g in gens))
            out[key]["cached_tokens"].append(statistics.median(g.cached_tokens for g in gens))
            out[key]["prefill_tokens"].append(statistics.median(g.prefill_tokens for g in gens))
    same = [a == b for a, b in zip(tokens["cached"], tokens["whole"], strict=True)]
    return out | {"same_tokens": sum(same), "requests": len(same)}


def main() -> None:
    from quantized import accuracy, bundle_for  # benchmarks/quantized.py: its bundles and easy-vqa scoring

    from vtprune.backends.ort import OrtVlm
    from vtprune.eval.data import load_questions, subsample
    from vtprune.images import load_image
    from vtprune.runtime.report import environment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--questions", type=int, default=200, help="easy-vqa test questions per runner (0: none)")
    ap.add_argument("--work", type=Path, default=Path(".bench/quantized"), help="where the bundles are exported")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pocket/prefix-cache"))
    ap.add_argument("--formats", default="fp32,w8a8+v8")
    ap.add_argument("--methods", default="none,gprune-64")
    args = ap.parse_args()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    questions = subsample(load_questions("test"), max(args.questions, 4), 0)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "environment": environment(),
                              "rounds": args.rounds, "questions": args.questions, "rows": {}}  # fmt: skip
    for name in args.methods.split(","):
        for fmt in args.formats.split(","):
            key, bundle = f"{name}/{fmt}", bundle_for(args.work, fmt, name, log)
            pair = {"cached": OrtVlm(bundle), "whole": OrtVlm(bundle, prefix_cache=False)}
            side = pair["cached"].adapter.min_image_side
            images = [load_image(q.image_path, side)
                      for q in list({q.image_path: q for q in questions}.values())[:4]]  # fmt: skip
            log(f"latency rounds {key}")
            lat = rounds(pair, images, args.rounds)
            row = {k: {s: statistics.median(v) for s, v in lat[k].items()} for k in pair}
            row |= {"rounds": {k: lat[k] for k in pair}, "same_tokens": lat["same_tokens"],
                    "requests": lat["requests"],
                    "ttft_ratio": statistics.median(a / b for a, b in zip(lat["cached"]["ttft_ms"],
                                                                         lat["whole"]["ttft_ms"], strict=True)),
                    "prefill_ratio": statistics.median(a / b for a, b in zip(lat["cached"]["prefill_ms"],
                                                                             lat["whole"]["prefill_ms"], strict=True))}
            if args.questions:
                for k, vlm in pair.items():
                    log(f"accuracy {key} {k}")
                    row[k] |= accuracy(vlm, questions[: args.questions])
            result["rows"][key] = row  # written after every bundle, so a long run can be cut short
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "prefix_cache.json").write_text(json.dumps(result, indent=2) + "\n")
            (args.out / "prefix_cache.md").write_text(to_markdown(result))
    print(to_markdown(result))


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# Pocket VLM: the prefix cache, ONNX Runtime CPU", "",
             f"{result['date']}; {env['cpu']}, {env['cores']} cores, ONNX Runtime "
             f"{env['libraries'].get('onnxruntime', '?')}; 1-minute load {env['load_avg']}. Latency: medians of "
             f"{result['rounds']} rounds alternating the two runners of each bundle (4 easy-vqa images, 16 new "
             f"tokens); ratios are medians of per-round ratios. Accuracy: {result['questions']} easy-vqa test "
             "questions (seed 0), greedy.", "",
             "| method | format | prefill tokens (cached) | TTFT ms, cache / whole | ratio | prefill ms, cache / whole "
             "| ratio | same tokens | accuracy gen, cache / whole | accuracy lik, cache / whole |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in result["rows"].items():
        method, fmt = key.split("/")
        c, w = r["cached"], r["whole"]
        acc = lik = "–"
        if "accuracy" in c:
            acc = f"{c['accuracy']:.3f} / {w['accuracy']:.3f}"
            lik = f"{c['likelihood_accuracy']:.3f} / {w['likelihood_accuracy']:.3f}"
        lines.append(f"| {method} | {fmt} | {c['prefill_tokens']:.0f} ({c['cached_tokens']:.0f}) | "
                     f"{c['ttft_ms']:.0f} / {w['ttft_ms']:.0f} | {r['ttft_ratio']:.2f} | "
                     f"{c['prefill_ms']:.0f} / {w['prefill_ms']:.0f} | {r['prefill_ratio']:.2f} | "
                     f"{r['same_tokens']}/{r['requests']} | {acc} | {lik} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
