"""Accuracy harnesses. ``run_eval`` measures easy-vqa exact-match accuracy under a pruning config."""

from __future__ import annotations

from vtprune.eval.harness import evaluate, run_eval
from vtprune.eval.scoring import ANSWERS, QUESTION_TYPES, answer_type, normalize_answer, summarize

__all__ = ["ANSWERS", "QUESTION_TYPES", "answer_type", "evaluate", "normalize_answer", "run_eval", "summarize"]
