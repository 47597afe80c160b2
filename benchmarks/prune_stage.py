"""G-Prune stage latency: PyTorch eager vs the exported ONNX graph (custom ops + function bodies) in
ONNX Runtime on the CPU, at LLaVA-1.5 (N=576) and LLaVA-NeXT high-res (N=2304) shapes, D=4096.

    python benchmarks/prune_stage.py [--threads 2] [--iters 20] [--out benchmarks/results]

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
from vtprune.config import PruneConfig
from vtprune.export.onnx_io import export_module
from vtprune.export.vision import prune_tokens
from vtprune.runtime.ort import make_session
from vtprune.runtime.report import environment, measure

CASES = [(576, 4096, 192), (576, 4096, 128), (576, 4096, 64), (2304, 4096, 640), (2304, 4096, 320)]


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
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [run_case(n, d, k, args.threads, args.iters, Path(tmp)) for n, d, k in CASES]
    result = {"benchmark": "prune_stage", "threads": args.threads, "environment": environment(), "cases": cases}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prune_stage.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "prune_stage.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
