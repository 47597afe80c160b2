"""easy-vqa accuracy under pruning: greedy answers from ``PrunedVlm``, exact match after normalisation.

``run_eval`` is the library entry point behind ``vtprune eval``; ``evaluate`` scores an already loaded
adapter (the projector training script uses it on its in-memory model).
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vtprune.config import PruneConfig
from vtprune.errors import ConfigError
from vtprune.eval.data import Question, load_questions, subsample
from vtprune.eval.scoring import normalize_answer, summarize

DEFAULT_MAX_NEW_TOKENS = 4  # every easy-vqa answer word is at most 3 SmolLM2 tokens


def run_eval(
    model: str,
    prune: PruneConfig,
    split: str,
    limit: int | None,
    seed: int,
    cache_dir: Path | None = None,
    progress: bool = True,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    dtype: str = "fp32",
    device: str = "cpu",
) -> dict[str, Any]:
    """Exact-match accuracy of ``model`` (a name such as ``pocket`` or a checkpoint dir) on easy-vqa.

    Args:
        model: anything ``load_vlm`` takes.
        prune: the pruning config applied to every question.
        split: ``train`` or ``test``.
        limit: number of questions drawn (without replacement, with ``seed``); None for the whole split.
        seed: subsampling seed; a fixed (limit, seed) always picks the same questions.
        cache_dir: where built-in models are cached.
        progress: draw a progress bar on stderr.
        max_new_tokens: greedy decoding length limit per answer.
        dtype: model weights dtype (``fp32``, ``fp16``, ``bf16``).
        device: where the PyTorch pipeline runs (``cpu``, ``cuda``, ``cuda:N``).

    Returns:
        A JSON-ready dict: settings, accuracy (overall, per question type), token budget, prefill FLOPs,
        wall time, the model's provenance and one record per question.
    """
    from vtprune.models import load_vlm

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    questions = subsample(load_questions(split), limit, seed)
    adapter = load_vlm(model, dtype, cache_dir=cache_dir, device=device)
    settings = {"model": str(model), "dtype": dtype, "device": device, "split": split, "limit": limit, "seed": seed}
    return settings | evaluate(adapter, questions, prune, max_new_tokens, progress)


def evaluate(
    adapter: Any,
    questions: Sequence[Question],
    prune: PruneConfig,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
    warmup: bool = True,
) -> dict[str, Any]:
    """Answer and score ``questions`` with a loaded adapter; see ``run_eval`` for the result's keys.

    One untimed warm-up generation runs first (``warmup``) so first-call allocations do not skew the
    wall time.
    """
    from vtprune.runtime.pipeline import PrunedVlm

    pipeline = PrunedVlm(adapter, prune)
    images = _ImageCache(adapter.min_image_side)
    if warmup and questions:
        pipeline.generate(images.get(questions[0]), questions[0].question, max_new_tokens)
    records, generations = [], []
    start = time.perf_counter()
    bar = _progress_bar(len(questions), progress)
    for q in questions:
        gen = pipeline.generate(images.get(q), q.question, max_new_tokens)
        records.append(_record(q, gen.answer))
        generations.append(gen)
        _advance(bar, records)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - start
    return {
        "prune": prune.to_dict(), "max_new_tokens": max_new_tokens, "model_info": model_info(adapter),
        "n": len(records), **summarize(records), "tokens": token_stats(generations),
        "flops": flops_stats(generations), "time": time_stats(generations, wall), "environment": environment(),
        "items": records,
    }  # fmt: skip


class _ImageCache:
    """Decoded images by path; easy-vqa asks several questions about each image."""

    def __init__(self, min_side: int) -> None:
        self._min_side, self._images = min_side, {}

    def get(self, q: Question) -> Any:
        from vtprune.images import load_image

        if q.image_path not in self._images:
            self._images[q.image_path] = load_image(q.image_path, self._min_side)
        return self._images[q.image_path]


def _record(q: Question, output: str) -> dict[str, Any]:
    prediction = normalize_answer(output)
    return {
        "index": q.index, "image_id": q.image_id, "question": q.question, "gold": q.answer, "type": q.qtype,
        "output": output, "prediction": prediction, "correct": prediction == q.answer,
    }  # fmt: skip


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="easy-vqa", unit="q", file=sys.stderr, dynamic_ncols=True)


def _advance(bar: Any, records: list[dict[str, Any]]) -> None:
    if bar is None:
        return
    bar.set_postfix(acc=f"{sum(r['correct'] for r in records) / len(records):.3f}", refresh=False)
    bar.update(1)


# --- aggregates ----------------------------------------------------------------------------------
def token_stats(generations: Iterable[Any]) -> dict[str, Any]:
    """Mean token budget per question: visual tokens total/kept, prompt and prefill lengths."""
    gens = list(generations)
    keys = ("visual_tokens_total", "visual_tokens_kept", "prompt_tokens", "prefill_tokens")
    out: dict[str, Any] = {k: statistics.fmean(getattr(g, k) for g in gens) if gens else 0.0 for k in keys}
    if gens and gens[0].layer_visual_tokens is not None:  # in-LLM methods: per decoder layer
        per_layer = zip(*(g.layer_visual_tokens for g in gens), strict=True)
        out["layer_visual_tokens"] = [statistics.fmean(v) for v in per_layer]
    return out


def flops_stats(generations: Iterable[Any]) -> dict[str, Any]:
    """Prefill FLOPs (2 x MACs) per question, mean, unpruned vs pruned, and the net share saved."""
    generations = list(generations)
    reports = [g.flops for g in generations]
    if not reports:
        return {}
    unpruned = statistics.fmean(r.prefill_macs_unpruned for r in reports) * 2
    pruned = statistics.fmean(r.prefill_macs_pruned for r in reports) * 2
    stage = statistics.fmean(r.prune_stage_macs for r in reports) * 2
    out = {
        "prefill_gflops_unpruned": unpruned / 1e9, "prefill_gflops_pruned": pruned / 1e9,
        "prune_stage_gflops": stage / 1e9, "saved_fraction": 1.0 - (pruned + stage) / unpruned,
    }  # fmt: skip
    layers = [g.layer_macs for g in generations if g.layer_macs is not None]
    if layers:  # in-LLM methods: mean GFLOPs of each decoder layer (selector included)
        out["layer_gflops"] = [2 * statistics.fmean(v) / 1e9 for v in zip(*layers, strict=True)]
    return out


def time_stats(generations: Iterable[Any], wall_s: float) -> dict[str, Any]:
    """Total wall time and per-question stage medians (ms)."""
    gens = list(generations)
    stages = list(gens[0].timings_ms) if gens else []
    per_stage = {s: statistics.median(g.timings_ms.get(s, 0.0) for g in gens) for s in stages}
    totals = [sum(g.timings_ms.values()) for g in gens]
    return {
        "wall_s": wall_s, "per_question_ms_mean": 1e3 * wall_s / len(gens) if gens else None,
        "per_question_ms_median": statistics.median(totals) if totals else None, "stage_ms_median": per_stage,
    }  # fmt: skip


def model_info(adapter: Any) -> dict[str, Any]:
    """Family and checkpoint path; for the pocket model, whether its projector is trained."""
    from vtprune.models.pocket import read_marker

    info: dict[str, Any] = {"family": adapter.family, "path": str(adapter.path)}
    marker = read_marker(adapter.path)
    if marker is not None:
        proj = marker.get("projector", {})
        info["pocket_projector_trained"] = bool(proj.get("trained"))
        info["pocket_projector"] = proj
        if not proj.get("trained"):
            info["warning"] = "pocket projector is UNTRAINED (seeded init); the model answers from text alone"
    return info


def environment() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
    }  # fmt: skip
