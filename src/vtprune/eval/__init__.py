"""Accuracy harnesses: ``run_eval`` (a checkpoint in PyTorch) and ``evaluate_runner`` (any runner, bundles
included) score easy-vqa or a local data set (``load_data``) by generation and by likelihood."""

from __future__ import annotations

from vtprune.eval.data import EvalData, Question, load_data, load_easy_vqa
from vtprune.eval.harness import evaluate, evaluate_runner, run_eval
from vtprune.eval.scoring import (
    ANSWERS,
    QUESTION_TYPES,
    answer_type,
    normalize_answer,
    summarize,
    vqa_accuracy,
    vqa_normalize,
)

__all__ = [
    "ANSWERS", "QUESTION_TYPES", "EvalData", "Question", "answer_type", "evaluate", "evaluate_runner",
    "load_data", "load_easy_vqa", "normalize_answer", "run_eval", "summarize", "vqa_accuracy", "vqa_normalize",
]  # fmt: skip
