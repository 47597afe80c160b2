#!/usr/bin/env python
"""CUDA smoke check of the PyTorch pipeline: every method on every tiny family (and the pocket VLM, with
``--pocket``) answers on ``--device`` exactly as on the CPU (same greedy tokens, same visual tokens kept).

    PYTHONPATH=src python scripts/gpu_smoke.py [--device cuda] [--pocket] [--cache-dir DIR]

Prints one line per (model, method) and exits 1 if any differs or fails. The CPU has no CUDA to compare
against, so this runs on a GPU machine (scripts/README.md); tests/runtime/test_device.py checks on the
CPU that the pipeline creates no tensor off the model's device.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

from vtprune.config import PruneConfig
from vtprune.models import load_vlm
from vtprune.models.tiny import TINY_MODELS
from vtprune.runtime.pipeline import PrunedVlm

QUESTION = "what color is the shape ?"


def configs(layer: int) -> dict[str, PruneConfig]:
    keep = 6 if layer == 1 else 64
    return {
        "none": PruneConfig(), "gprune": PruneConfig("gprune", keep), "random": PruneConfig("random", keep),
        "uniform": PruneConfig("uniform", keep), "divprune": PruneConfig("divprune", keep),
        "visionzip": PruneConfig("visionzip", keep), "fastv": PruneConfig("fastv", keep, layer=layer),
        "dart": PruneConfig("dart", keep, layer=layer), "alvts": PruneConfig("alvts", keep, layer=layer),
        "alvts-kv-instr": PruneConfig("alvts", keep, layer=layer, skip="kv", query="instruction"),
        "alvts-exact": PruneConfig("alvts", keep, layer=layer, selector="exact"),
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--pocket", action="store_true", help="also the pocket VLM (needs its wheels)")
    p.add_argument("--cache-dir", type=Path)
    args = p.parse_args()
    from vtprune.images import scene_image

    image, failures = scene_image(), 0
    models = sorted(TINY_MODELS) + (["pocket"] if args.pocket else [])
    for name in models:
        cpu = load_vlm(name, cache_dir=args.cache_dir)
        gpu = load_vlm(name, cache_dir=args.cache_dir, device=args.device)
        for method, cfg in configs(2 if name == "pocket" else 1).items():
            try:
                cpu.check_prune(cfg)
            except Exception as exc:  # noqa: BLE001 - a method this family refuses
                print(f"{name:18} {method:15} refused: {str(exc)[:60]}")
                continue
            try:
                ref = PrunedVlm(cpu, cfg).generate(image, QUESTION, 8)
                out = PrunedVlm(gpu, cfg).generate(image, QUESTION, 8)
                same = (out.token_ids, out.visual_tokens_kept) == (ref.token_ids, ref.visual_tokens_kept)
                failures += not same
                print(f"{name:18} {method:15} {'same' if same else 'DIFFERENT'}: tokens {out.token_ids} vs cpu "
                      f"{ref.token_ids}; kept {out.visual_tokens_kept}; ttft {out.ttft_ms:.1f} ms vs cpu "
                      f"{ref.ttft_ms:.1f} ms", flush=True)  # fmt: skip
            except Exception:  # noqa: BLE001 - report every failure, keep going
                failures += 1
                print(f"{name:18} {method:15} FAILED:\n{traceback.format_exc()}", flush=True)
        del gpu
        torch.cuda.empty_cache()
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
