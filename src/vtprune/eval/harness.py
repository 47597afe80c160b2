"""Accuracy under pruning, by generation and by likelihood, on easy-vqa or the user's data, with any runner.

``run_eval`` is the library entry point behind ``vtprune eval`` for a checkpoint in PyTorch;
``evaluate_runner`` scores any runner (a bundle on ONNX Runtime included); ``evaluate`` scores easy-vqa
questions with an already loaded adapter (the projector training script uses it on its in-memory model).

Each question is answered greedily; when it has a closed answer set (``EvalData.candidates``), the same
prefill also scores every candidate's log-likelihood as the reply, so "did the information survive
pruning" (likelihood) is measured apart from "did the model keep its answer format" (generation).
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from vtprune.config import PruneConfig
from vtprune.errors import ConfigError
from vtprune.eval.data import EvalData, Question, load_easy_vqa
from vtprune.eval.scoring import ANSWERS, score_record, summarize

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
    data: EvalData | None = None,
    likelihood: bool = True,
) -> dict[str, Any]:
    """Accuracy of ``model`` (a name such as ``pocket`` or a checkpoint dir) in PyTorch on easy-vqa
    ``split``, or on ``data`` (``load_data``) when given.

    Args:
        model: anything ``load_vlm`` takes.
        prune: the pruning config applied to every question.
        split: easy-vqa's ``train`` or ``test`` (when ``data`` is None).
        limit: number of questions drawn (without replacement, with ``seed``); None for the whole split.
        seed: subsampling seed; a fixed (limit, seed) always picks the same questions.
        cache_dir: where built-in models are cached.
        progress: draw a progress bar on stderr.
        max_new_tokens: greedy decoding length limit per answer.
        dtype: model weights dtype (``fp32``, ``fp16``, ``bf16``).
        device: where the PyTorch pipeline runs (``cpu``, ``cuda``, ``cuda:N``).
        data: a local data set instead of easy-vqa.
        likelihood: also score closed answer sets by log-likelihood.

    Returns:
        A JSON-ready dict: settings, accuracy (overall, per question type; by generation and by
        likelihood), token budget, prefill FLOPs, wall time, the model's provenance and one record per
        question.
    """
    from vtprune.models import load_vlm
    from vtprune.runtime.pipeline import PrunedVlm

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    data = data if data is not None else load_easy_vqa(split, limit, seed)
    adapter = load_vlm(model, dtype, cache_dir=cache_dir, device=device)
    settings = {"model": str(model), "backend": "torch", "dtype": dtype, "device": device} | data_settings(
        data, limit, seed)  # fmt: skip
    runner = PrunedVlm(adapter, prune)
    return settings | evaluate_runner(runner, data, max_new_tokens, progress, likelihood=likelihood)


def data_settings(data: EvalData, limit: int | None, seed: int) -> dict[str, Any]:
    split = data.info.get("split")
    return {"data": data.name, "data_info": data.info, "split": split, "limit": limit, "seed": seed}


def evaluate(
    adapter: Any,
    questions: Sequence[Question],
    prune: PruneConfig,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
    warmup: bool = True,
    likelihood: bool = False,
) -> dict[str, Any]:
    """Answer and score easy-vqa ``questions`` with a loaded adapter in PyTorch (``evaluate_runner``)."""
    from vtprune.runtime.pipeline import PrunedVlm

    data = EvalData("easy-vqa", "easy-vqa", list(questions), ANSWERS)
    return evaluate_runner(PrunedVlm(adapter, prune), data, max_new_tokens, progress, warmup, likelihood)


def evaluate_runner(
    runner: Any,
    data: EvalData,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
    warmup: bool = True,
    likelihood: bool = True,
    done: Sequence[dict[str, Any]] = (),
    checkpoint: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Answer and score ``data`` with any runner (PyTorch, ONNX Runtime, TensorRT); see ``run_eval``.

    ``done`` are records of an interrupted run of the same settings (resumed: their questions are not
    asked again); ``checkpoint`` receives the records so far every ``CHECKPOINT_EVERY`` questions.
    One untimed warm-up generation runs first (``warmup``) so first-call allocations do not skew the
    wall time.
    """
    from vtprune.runtime.generate import generate

    images = _ImageCache(data, runner.adapter.min_image_side)
    answered = {r["key"] for r in done}
    todo = [q for q in data.questions if q.key not in answered]
    if warmup and todo:
        generate(runner, images.get(todo[0]), todo[0].question, max_new_tokens)
    records, generations = list(done), []
    start = time.perf_counter()
    bar = _progress_bar(len(data.questions), progress, data.name)
    if bar is not None and records:
        bar.update(len(records))
    for q in todo:
        cands = data.candidates(q) if likelihood else None
        forms = _candidate_forms(runner.adapter, cands, data.kind == "easy-vqa") if cands else None
        gen = generate(runner, images.get(q), q.question, max_new_tokens,
                       candidates=[ids for _, ids in forms] if forms else None)  # fmt: skip
        records.append(score_record(data, q, gen.answer, _candidate_scores(cands, forms, gen.candidate_logprobs))
                       | {"visual_tokens_kept": gen.visual_tokens_kept, "ttft_ms": gen.ttft_ms})  # fmt: skip
        generations.append(gen)
        _advance(bar, records)
        if checkpoint is not None and len(generations) % CHECKPOINT_EVERY == 0:
            checkpoint(records)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - start
    order = {q.key: i for i, q in enumerate(data.questions)}
    records.sort(key=lambda r: order.get(r["key"], len(order)))
    return {
        "prune": runner.cfg.to_dict(), "max_new_tokens": max_new_tokens, "model_info": model_info(runner.adapter),
        "n": len(records), **summarize(records, data.kind), "tokens": token_stats(generations),
        "flops": flops_stats(generations), "time": time_stats(generations, wall), "environment": environment(),
        "resumed": len(done), "items": records,
    }  # fmt: skip


CHECKPOINT_EVERY = 10


def _candidate_forms(adapter: Any, candidates: Sequence[str], as_written: bool = False) -> list[tuple[int, list[int]]]:
    """Each candidate answer as the reply would start: as written and capitalised (when different; only as
    written for easy-vqa, whose answers and the pocket VLM's replies are lower case); (candidate index,
    token ids) pairs."""
    out = []
    for i, c in enumerate(candidates):
        for form in dict.fromkeys((c,) if as_written else (c, c[:1].upper() + c[1:])):
            ids = adapter.tokenizer.encode(form, add_special_tokens=False)
            if ids:
                out.append((i, list(ids)))
    return out


def _candidate_scores(
    candidates: Sequence[str] | None, forms: list[tuple[int, list[int]]] | None, logprobs: list[float] | None
) -> dict[str, float] | None:
    """Each candidate's log-likelihood: the best of its written forms."""
    if not candidates or not forms or logprobs is None:
        return None
    best = [float("-inf")] * len(candidates)
    for (i, _), lp in zip(forms, logprobs, strict=True):
        best[i] = max(best[i], lp)
    return dict(zip(candidates, best, strict=True))


class _ImageCache:
    """Decoded images by image id; a data set often asks several questions about each image."""

    def __init__(self, data: EvalData, min_side: int) -> None:
        self._data, self._min_side, self._images = data, min_side, {}

    def get(self, q: Question) -> Any:
        key = q.image_path or q.image_id
        if key not in self._images:
            if len(self._images) > 64:  # bounded: a large data set's images are not all kept
                self._images.clear()
            self._images[key] = self._data.image(q, self._min_side)
        return self._images[key]


def _progress_bar(total: int, enabled: bool, desc: str = "eval") -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="q", file=sys.stderr, dynamic_ncols=True)


def _advance(bar: Any, records: list[dict[str, Any]]) -> None:
    if bar is None:
        return
    post = {"acc": f"{sum(r['correct'] for r in records) / len(records):.3f}"}
    scored = [r["lik_correct"] for r in records if r.get("lik_correct") is not None]
    if scored:
        post["lik"] = f"{sum(scored) / len(scored):.3f}"
    bar.set_postfix(post, refresh=False)
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
