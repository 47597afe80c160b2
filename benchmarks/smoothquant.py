"""SmoothQuant for w8a8 on the pocket VLM: what each part of ``export.smooth`` buys, decoder by decoder.

    python benchmarks/smoothquant.py [--prompts 48] [--rounds 5] [--out benchmarks/results/pocket/smoothquant]

The G-Prune 64 decoder is traced once from the model as loaded and once from its SmoothQuant-ed copy
(calibrated as ``vtprune export --weights w8a8`` does: 32 easy-vqa train images), then quantized four ways:

- ``unsmoothed, down block-wise``: w8a8 before SmoothQuant (every down projection in block-wise int8);
- ``unsmoothed, all dynamic``: every MatMul in dynamic per-tensor int8, no smoothing;
- ``smoothed, all dynamic``: SmoothQuant, every MatMul dynamic;
- ``smoothed, outliers block-wise``: SmoothQuant, the down projections past ``BLOCKWISE_RATIO`` block-wise
  (what ``--weights w8a8`` ships).

Each is fed the fp32 bundle's own prefill inputs for ``--prompts`` easy-vqa test questions (so only the
decoder differs) and compared with the fp32 decoder: next-token KL(fp32 || w8a8) in nats (mean, p90, max)
and top-1 agreement; prefill time is the median over rounds that alternate the decoders (10 runs of one
prompt each). Writes smoothquant.json and smoothquant.md with the environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import onnxruntime as ort

    from vtprune.api import export_bundle
    from vtprune.backends.ort import OrtVlm
    from vtprune.config import PruneConfig
    from vtprune.eval.data import load_questions, subsample
    from vtprune.export.bundle import ExportConfig
    from vtprune.export.decoder import export_decoder
    from vtprune.export.quantize import quantize_graph
    from vtprune.export.smooth import prefill_feeds, smoothed_copy
    from vtprune.images import calibration_images, load_image
    from vtprune.models import load_vlm
    from vtprune.runtime.report import environment
    from vtprune.runtime.timing import StageTimer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path(".bench/quantized"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pocket/smoothquant"))
    args = ap.parse_args()
    prune = PruneConfig(method="gprune", keep=64)
    fp32 = args.work / "gprune-64-fp32"
    if not (fp32 / "manifest.json").is_file():
        export_bundle("pocket", prune, ExportConfig(), fp32)
    vlm = OrtVlm(fp32)

    def feed(question: object) -> dict[str, np.ndarray]:
        image = load_image(question.image_path, vlm.adapter.min_image_side)
        pre = vlm.prefill_inputs(vlm.inputs(image, question.question), StageTimer())
        mask = np.ones((1, pre["embeds"].shape[1]))
        return vlm.typed("decoder", {"inputs_embeds": pre["embeds"], "position_ids": pre["positions"],
                                     "attention_mask": mask}) | vlm._empty_past()  # fmt: skip

    feeds = [feed(q) for q in subsample(load_questions("test"), args.prompts, 0)]
    with tempfile.TemporaryDirectory(prefix="vtprune-sq-") as tmp:
        work = Path(tmp)
        adapter = load_vlm("pocket")
        images = calibration_images("easy-vqa", 32)
        twin, record = smoothed_copy(adapter, prefill_feeds(adapter, prune, images))
        record["calibration_images"] = len(images)
        export_decoder(twin, work / "smoothed.onnx")
        plain = (fp32 / "decoder.onnx").read_bytes()
        variants = {"unsmoothed, down block-wise": (plain, None), "unsmoothed, all dynamic": (plain, []),
                    "smoothed, all dynamic": ((work / "smoothed.onnx").read_bytes(), []),
                    "smoothed, outliers block-wise": ((work / "smoothed.onnx").read_bytes(), record["blockwise"])}
        sessions = {}
        for i, (name, (data, blockwise)) in enumerate(variants.items()):
            path = work / f"v{i}.onnx"
            path.write_bytes(data)
            quantize_graph(path, "w8a8", blockwise)
            sessions[name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ref = ort.InferenceSession(str(fp32 / "decoder.onnx"), providers=["CPUExecutionProvider"])
        want = [ref.run(["logits"], f)[0][0, -1] for f in feeds]
        rows = {}
        for name, sess in sessions.items():
            kls, agree = [], 0
            for f, w in zip(feeds, want, strict=True):
                got = sess.run(["logits"], f)[0][0, -1]
                p, q = _log_softmax(w), _log_softmax(got)
                kls.append(float((np.exp(p) * (p - q)).sum()))
                agree += int(w.argmax() == got.argmax())
            rows[name] = {"kl_mean": float(np.mean(kls)), "kl_p90": float(np.percentile(kls, 90)),
                          "kl_max": float(np.max(kls)), "top1_agreement": agree / len(feeds), "prefill_ms": []}
        for _ in range(args.rounds):  # alternate the decoders, one prompt, 10 runs each per round
            for name, sess in [("fp32", ref), *sessions.items()]:
                start = time.perf_counter()
                for _ in range(10):
                    sess.run(None, feeds[0])
                rows.setdefault(name, {"prefill_ms": []})["prefill_ms"].append((time.perf_counter() - start) * 100)
    for r in rows.values():
        r["prefill_ms_median"] = statistics.median(r["prefill_ms"])
    result = {"date": time.strftime("%Y-%m-%d"), "environment": environment(), "prompts": args.prompts,
              "rounds": args.rounds, "prefill_tokens": int(feeds[0]["inputs_embeds"].shape[1]),
              "smoothing": record, "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smoothquant.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "smoothquant.md").write_text(to_markdown(result))
    print(to_markdown(result))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


def to_markdown(result: dict) -> str:
    env, sm = result["environment"], result["smoothing"]
    lines = ["# Pocket VLM: SmoothQuant for w8a8, G-Prune 64 decoder, ONNX Runtime CPU", "",
             f"{result['date']}; {env['cpu']}, {env['cores']} cores, ONNX Runtime "
             f"{env['libraries'].get('onnxruntime', '?')}; 1-minute load {env['load_avg']}. Next-token KL(fp32 || "
             f"w8a8) over {result['prompts']} easy-vqa test prompts, each decoder fed the fp32 bundle's prefill "
             f"inputs; prefill of one {result['prefill_tokens']}-token prompt, median of {result['rounds']} "
             f"alternating rounds. Smoothing: alpha {sm['alpha_norm']} at the norms, {sm['alpha_down']} at the down "
             f"projections, calibrated on {sm['calibration_images']} easy-vqa train images; largest input channel "
             f"{sm['outlier_ratio_before']:.0f}x the median before, {sm['outlier_ratio_after']:.0f}x after; kept "
             f"block-wise: {', '.join(sm['blockwise']) or 'none'}.", "",
             "| decoder | KL mean | KL p90 | KL max | top-1 agreement | prefill ms |", "|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        if name == "fp32":
            lines.append(f"| fp32 | – | – | – | – | {r['prefill_ms_median']:.1f} |")
            continue
        lines.append(f"| {name} | {r['kl_mean']:.3f} | {r['kl_p90']:.3f} | {r['kl_max']:.3f} | "
                     f"{r['top1_agreement']:.2f} | {r['prefill_ms_median']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
