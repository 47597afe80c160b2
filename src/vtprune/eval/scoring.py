"""easy-vqa answer normalisation and exact-match scoring: pure functions, no model, no data files.

Normalisation rule (``normalize_answer``), applied to the model's decoded output:
  1. lowercase;
  2. every character other than ``a-z`` and ``0-9`` becomes a space (punctuation is stripped);
  3. split into words and return the first word that names one of the 13 answers, where a word also
     names an answer through its plural (``circles`` -> ``circle``) or the alias ``grey`` -> ``gray``;
  4. no such word: ``None``, scored as wrong.
So ``"Circle."`` -> ``circle``; ``"No, there is not a blue shape"`` -> ``no``; ``"The shape is red"`` ->
``red`` (the first answer word wins, even when a later one would have been right).

A question's type comes from its gold answer: ``yes``/``no`` -> ``yes/no``, a shape name -> ``shape``,
a colour -> ``color``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

YES_NO = ("yes", "no")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "black", "gray", "brown", "teal")
ANSWERS = YES_NO + SHAPES + COLORS  # easy-vqa 1.0's 13 answers (checked against the package on load)
QUESTION_TYPES = ("shape", "color", "yes/no")
ALIASES = {"grey": "gray"}

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def answer_type(answer: str) -> str:
    """``shape``, ``color`` or ``yes/no`` for a gold answer."""
    if answer in YES_NO:
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    raise ValueError(f"{answer!r} is not an easy-vqa answer")


def _as_answer(word: str) -> str | None:
    word = ALIASES.get(word, word)
    if word in ANSWERS:
        return word
    if word.endswith("s") and word[:-1] in ANSWERS:
        return word[:-1]
    return None


def normalize_answer(text: str) -> str | None:
    """The first answer word of a model output (see the module docstring), or None."""
    for word in _NON_ALNUM.sub(" ", text.lower()).split():
        answer = _as_answer(word)
        if answer is not None:
            return answer
    return None


def is_correct(output: str, gold: str) -> bool:
    """Exact match of the normalised output with the gold answer."""
    return normalize_answer(output) == gold


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy overall and per question type from records with ``gold``, ``prediction`` and ``correct``."""
    rows = list(records)
    out = _tally(rows)
    out["unparsed"] = sum(r["prediction"] is None for r in rows)
    out["by_type"] = {t: _tally([r for r in rows if answer_type(r["gold"]) == t]) for t in QUESTION_TYPES}
    return out


def _tally(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    correct = sum(bool(r["correct"]) for r in rows)
    return {"n": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else None}
