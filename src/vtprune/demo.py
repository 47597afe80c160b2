"""``vtprune demo``: the main job end to end on the embedded default (PyTorch on the CPU).

Until the pocket VLM with real trained weights lands, the demo runs a built-in tiny model with random
weights: the pipeline, pruning, position ids, FLOPs and timings are real, the answers are not.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from vtprune.config import PruneConfig
from vtprune.flops import FlopsReport

REPEATS = 5


def scene_image(width: int = 320, height: int = 240) -> Any:
    """A synthetic scene: a red circle and a blue rectangle on a gray background."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 60, 140, 160), fill=(220, 30, 30))
    draw.rectangle((190, 40, 290, 200), fill=(30, 60, 220))
    return image


def _timed(pipeline: Any, image: Any, prompt: str) -> tuple[Any, dict[str, float]]:
    pipeline.generate(image, prompt, max_new_tokens=8)  # warm-up: first-call allocations
    runs = [pipeline.generate(image, prompt, max_new_tokens=8) for _ in range(REPEATS)]
    stages = runs[0].timings_ms.keys()
    return runs[-1], {s: statistics.median(r.timings_ms[s] for r in runs) for s in stages}


def _flops_line(f: FlopsReport) -> str:
    return f"prefill {f.prefill_macs_pruned / 1e6:.2f} MMACs (saved {100 * f.saved_fraction:.1f}% net)"


def run_demo(model: str, image_path: Path | None, prompt: str, keep: int | float, cache_dir: Path | None) -> int:
    from vtprune.models import load_vlm
    from vtprune.models.tiny import TINY_MODELS
    from vtprune.runtime.images import load_image
    from vtprune.runtime.pipeline import PrunedVlm

    if model in TINY_MODELS:
        print(f"NOTE: {model} has tiny RANDOM weights, so its answers are gibberish; the pipeline, pruning,")
        print("      FLOPs and timings are real. The real-weights pocket VLM replaces it when it lands.")
    print(f"loading {model} ...", flush=True)
    adapter = load_vlm(model, cache_dir=cache_dir)
    image = load_image(image_path, adapter.min_image_side) if image_path else scene_image()
    print(f"image: {image_path or 'generated scene (red circle, blue rectangle)'} {image.size[0]}x{image.size[1]}")
    print(f"question: {prompt}\n")
    rows = []
    for cfg in (PruneConfig(), PruneConfig(method="gprune", keep=keep)):
        result, ms = _timed(PrunedVlm(adapter, cfg), image, prompt)
        label = "unpruned" if not cfg.prunes else "gprune"
        print(f"[{label}{'' if not cfg.prunes else f' --keep {keep}'}] answer: {result.answer}")
        kept = f"{result.visual_tokens_kept}/{result.visual_tokens_total}"
        print(f"    visual tokens {kept}, {_flops_line(result.flops)}")
        rows.append((label, ms))
    print(f"\nlatency, median of {REPEATS} runs after warm-up (ms, PyTorch CPU):")
    stages = list(rows[0][1])
    print("  " + " ".join(f"{s:>10}" for s in ["", *stages, "total"]))
    for label, ms in rows:
        print("  " + f"{label[:10]:>10}" + "".join(f" {ms[s]:>10.2f}" for s in stages) + f" {sum(ms.values()):>10.2f}")
    return 0
