"""Tie margins: how far ONNX Runtime's kept sets lie from PyTorch's, on real pocket projector features, with
PyTorch's own CPU kernels and with the kernels a CPU without AVX-512 runs (MKL, oneDNN and ATen limited to
AVX2: last bits differ as they do between our Intel Xeon and AMD EPYC machines). This is the measurement
behind ``vtprune.prune.ties.FP32_MARGIN``.

    python benchmarks/tie_margins.py [--images 64] [--budgets 128,64,32,16] [--out benchmarks/results/ties]

The features (easy-vqa test images through the pocket vision tower and projector) are computed once; the
pruning stage is exported per method and budget and run in ONNX Runtime; PyTorch then chooses on the same
features in two processes, one per kernel setting, and scores ONNX Runtime's set with the method's tie
margin. Writes tie_margins.json and tie_margins.md (environment recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

METHODS = ("gprune", "divprune")
OTHER_KERNELS = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


class Stage(torch.nn.Module):
    def __init__(self, method: str, k: int) -> None:
        super().__init__()
        from vtprune.config import PruneConfig

        self.k, self.cfg = k, PruneConfig(method=method, keep=k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from vtprune.export.vision import prune_tokens

        return prune_tokens(x, torch.ones(x.shape[:2], dtype=torch.bool), self.cfg, self.k)


def ort_kept(feats: torch.Tensor, method: str, k: int, tmp: Path) -> np.ndarray:
    """(images, k) ONNX Runtime's kept indices, image by image (batch 1, as the bundles run)."""
    import vtprune.export.ops  # noqa: F401
    from vtprune.backends.ort import make_session
    from vtprune.export.onnx_io import export_module

    path = tmp / f"{method}_{k}.onnx"
    export_module(Stage(method, k), (feats[:2],), path, ["x"], ["tokens", "indices"],
                  {"x": {0: torch.export.Dim.DYNAMIC}}, 18)  # fmt: skip
    session = make_session(path, "cpu", 2)
    return np.concatenate([session.run(None, {"x": row.numpy()})[1] for row in feats.split(1)])


def judge(feats: torch.Tensor, kept: dict[str, np.ndarray]) -> dict:
    """In this process's kernels: per method and budget, PyTorch's set vs ONNX Runtime's, and its margin."""
    from vtprune.check.validate import iou
    from vtprune.config import PruneConfig
    from vtprune.prune import selector

    out = {}
    for key, got in kept.items():
        method, k = key.split(":")[0], int(key.split(":")[1])
        cfg, sel = PruneConfig(method=method, keep=k), selector(method)
        valid = torch.ones(1, feats.shape[1], dtype=torch.bool)
        rows = []
        with torch.inference_mode():
            for x, g in zip(feats.split(1), got, strict=True):
                own = sel(x, valid, k, cfg)[0].numpy()
                margin = float(sel.tie_margin(x, valid, k, cfg, torch.from_numpy(g)[None].long())[0])
                rows.append({"same": bool(np.array_equal(np.sort(own), np.sort(g))), "iou": iou(own, g),
                             "margin": margin})  # fmt: skip
        margins = [r["margin"] for r in rows]
        out[key] = {"images": len(rows), "same_kept_sets": sum(r["same"] for r in rows),
                    "iou_min": min(r["iou"] for r in rows), "max_margin": max(margins),
                    "margins_of_differing_sets": sorted(r["margin"] for r in rows if not r["same"])}  # fmt: skip
    return out


def to_markdown(result: dict) -> str:
    env = result["environment"]
    other = ", ".join(f"{k}={v}" for k, v in OTHER_KERNELS.items())
    lines = ["# Tie margins: ONNX Runtime's kept sets against PyTorch's, two kernel settings", "",
             f"Machine: {env['cpu']}, {env['cores']} cores; {result['images']} easy-vqa test images (pocket "
             f"projector features, 256 x 576); {result['date']}.", "",
             f"`native`: PyTorch's kernels for this CPU. `avx2`: {other} (what a CPU without AVX-512 runs). "
             "ONNX Runtime's MLAS kernels are the same in both.", "",
             f"Tie margin limit for fp32 bundles: {result['fp32_margin']:g} of the score range.", "",
             "| method | K | kernels | same kept set | IoU min | max margin |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for key in sorted(result["native"], key=lambda key: (key.split(":")[0], -int(key.split(":")[1]))):
        method, k = key.split(":")
        for kind in ("native", "avx2"):
            c = result[kind][key]
            lines.append(f"| {method} | {k} | {kind} | {c['same_kept_sets']}/{c['images']} | {c['iou_min']:.3f} | "
                         f"{c['max_margin']:.2g} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--budgets", default="128,64,32,16")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ties"))
    ap.add_argument("--judge", type=Path, help=argparse.SUPPRESS)  # internal: one kernel setting's process
    args = ap.parse_args()
    if args.judge:
        from safetensors.torch import load_file

        data = load_file(str(args.judge))
        kept = {k: v.numpy() for k, v in data.items() if k != "features"}
        print(json.dumps(judge(data["features"], kept)))
        return
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from prune_stage import pocket_features

    from vtprune.prune.ties import FP32_MARGIN
    from vtprune.runtime.report import environment

    feats = pocket_features(args.images).contiguous()
    result = {"images": args.images, "fp32_margin": FP32_MARGIN, "environment": environment(),
              "date": __import__("datetime").date.today().isoformat()}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        kept = {f"{m}:{k}": ort_kept(feats, m, int(k), Path(tmp)) for m in METHODS for k in args.budgets.split(",")}
        data = Path(tmp) / "data.safetensors"
        save_file({"features": feats} | {k: torch.from_numpy(v) for k, v in kept.items()}, str(data))
        for kind, extra in (("native", {}), ("avx2", OTHER_KERNELS)):
            cmd = [sys.executable, __file__, "--judge", str(data)]
            proc = subprocess.run(cmd, env=os.environ | extra, capture_output=True, text=True, check=True)
            result[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tie_margins.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "tie_margins.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
