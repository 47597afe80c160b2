"""G-Prune stage latency: PyTorch eager vs the exported ONNX graph (custom ops + function bodies) in
ONNX Runtime on the CPU, at the pocket VLM shape (N=256, D=576) and at LLaVA-1.5 (N=576) and LLaVA-NeXT
high-res (N=2304) shapes, D=4096 (random features), and on real pocket projector features of easy-vqa
test images (kept sets compared image by image: real features have near-tied scores).

    python benchmarks/prune_stage.py [--threads 2] [--iters 20] [--pocket-images 32] [--out benchmarks/results]
    python benchmarks/prune_stage.py --pocket-images 32 --save-features F.safetensors   # input for prune_kernels.py

Writes prune_stage.json and prune_stage.md (medians from one run, environment recorded).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import vtprune.export.ops  # noqa: F401
from vtprune.backends.ort import make_session
from vtprune.check.validate import iou
from vtprune.config import PruneConfig
from vtprune.export.onnx_io import export_module
from vtprune.export.vision import prune_tokens
from vtprune.runtime.report import environment, measure

CASES = [(256, 576, 64), (576, 4096, 192), (576, 4096, 128), (576, 4096, 64), (2304, 4096, 640), (2304, 4096, 320)]


class Stage(torch.nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.cfg = k, PruneConfig(method="gprune", keep=k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = torch.ones(x.shape[:2], dtype=torch.bool)
        return prune_tokens(x, valid, self.cfg, self.k)


def run_case(n: int, d: int, k: int, threads: int, iters: int, tmp: Path) -> dict:
    x = torch.randn(1, n, d, generator=torch.Generator().manual_seed(0))
    stage = Stage(k)
    path = tmp / f"stage_{n}_{k}.onnx"
    export_module(stage, (x.repeat(2, 1, 1),), path, ["x"], ["tokens", "indices"],
                  {"x": {0: torch.export.Dim.DYNAMIC}}, 18)  # fmt: skip
    session = make_session(path, "cpu", threads)
    feeds = {"x": x.numpy()}
    with torch.inference_mode():
        ref_tokens, ref_idx = stage(x)
        torch_t = measure(lambda: stage(x), warmup=3, iters=iters)
    ort_tokens, ort_idx = session.run(None, feeds)
    ort_t = measure(lambda: session.run(None, feeds), warmup=3, iters=iters)
    return {"N": n, "D": d, "K": k, "torch_eager": torch_t.to_dict(), "ort_cpu": ort_t.to_dict(),
            "ort_over_torch_p50": ort_t.p50_ms / torch_t.p50_ms,
            "indices_equal": bool(np.array_equal(ort_idx, ref_idx.numpy())),
            "tokens_max_abs_diff": float(np.abs(ort_tokens - ref_tokens.numpy()).max())}  # fmt: skip


REAL_BUDGETS = (128, 64, 32)


def pocket_features(count: int) -> torch.Tensor:
    """Pocket projector outputs (count, 256, 576) of the first ``count`` easy-vqa test images."""
    from PIL import Image

    from vtprune.eval.data import load_questions
    from vtprune.models import load_vlm

    adapter = load_vlm("pocket")
    paths = list(dict.fromkeys(q.image_path for q in load_questions("test")))[:count]
    pixels = [adapter.prepare(Image.open(p).convert("RGB"), adapter.default_prompt("?"))["pixel_values"] for p in paths]
    with torch.inference_mode():
        return torch.cat([adapter.vision_features(px) for px in pixels])


def run_real(feats: torch.Tensor, k: int, threads: int, tmp: Path) -> dict:
    """Per image: same kept set in ORT as in PyTorch, and the batch-1 latency of both."""
    stage = Stage(k)
    path = tmp / f"stage_real_{k}.onnx"
    export_module(stage, (feats[:2],), path, ["x"], ["tokens", "indices"], {"x": {0: torch.export.Dim.DYNAMIC}}, 18)
    session = make_session(path, "cpu", threads)
    with torch.inference_mode():
        ious = [iou(session.run(None, {"x": row.numpy()})[1][0], stage(row)[1][0].numpy()) for row in feats.split(1)]
        x = feats[:1]
        torch_t = measure(lambda: stage(x), warmup=3, iters=50)
    ort_t = measure(lambda: session.run(None, {"x": x.numpy()}), warmup=3, iters=50)
    return {"images": feats.shape[0], "N": feats.shape[1], "D": feats.shape[2], "K": k,
            "same_kept_sets": sum(i == 1.0 for i in ious), "kept_iou_min": min(ious),
            "kept_iou_mean": float(np.mean(ious)),
            "torch_eager": torch_t.to_dict(), "ort_cpu": ort_t.to_dict(),
            "ort_over_torch_p50": ort_t.p50_ms / torch_t.p50_ms}  # fmt: skip


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# G-Prune stage: PyTorch eager vs ONNX Runtime CPU (function bodies)", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, GPU: {env['gpu'] or 'none'}; "
             f"threads={result['threads']}; torch {env['libraries'].get('torch')}, "
             f"onnxruntime {env['libraries'].get('onnxruntime')}.", "",
             "| N | D | K | torch p50 ms | ORT p50 ms | ORT/torch | same indices | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in result["cases"]:
        t, o = c["torch_eager"]["p50_ms"], c["ort_cpu"]["p50_ms"]
        lines.append(f"| {c['N']} | {c['D']} | {c['K']} | {t:.1f} | {o:.1f} | {c['ort_over_torch_p50']:.2f}"
                     f" | {c['indices_equal']} | {c['tokens_max_abs_diff']:.1e} |")  # fmt: skip
    if result.get("pocket_real"):
        lines += ["", "Real pocket projector features (easy-vqa test images), batch 1:", "",
                  "| N | D | K | images with the same kept set | kept-set IoU min / mean | torch p50 ms | ORT p50 ms "
                  "| ORT/torch |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in result["pocket_real"]:
            lines.append(f"| {c['N']} | {c['D']} | {c['K']} | {c['same_kept_sets']}/{c['images']} | "
                         f"{c['kept_iou_min']:.3f} / {c['kept_iou_mean']:.3f} | "
                         f"{c['torch_eager']['p50_ms']:.2f} | {c['ort_cpu']['p50_ms']:.2f} | "
                         f"{c['ort_over_torch_p50']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--pocket-images", type=int, default=32,
                    help="easy-vqa test images for the real-feature case (0: skip; needs pocket)")  # fmt: skip
    ap.add_argument("--save-features", type=Path, help="also write those features (safetensors 'features')")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    feats = pocket_features(args.pocket_images) if args.pocket_images else None
    if feats is not None and args.save_features:
        from safetensors.torch import save_file

        save_file({"features": feats.contiguous()}, str(args.save_features))
    with tempfile.TemporaryDirectory() as tmp:
        cases = [run_case(n, d, k, args.threads, args.iters, Path(tmp)) for n, d, k in CASES]
        real = [run_real(feats, k, args.threads, Path(tmp)) for k in REAL_BUDGETS] if feats is not None else []
    result = {"benchmark": "prune_stage", "threads": args.threads, "environment": environment(), "cases": cases,
              "pocket_real": real}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prune_stage.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "prune_stage.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
