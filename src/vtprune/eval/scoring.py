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
from collections.abc import Iterable, Mapping, Sequence
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


def score_record(data: Any, q: Any, output: str, likelihoods: Mapping[str, float] | None) -> dict[str, Any]:
    """One question's record: the generated answer scored (easy-vqa: first answer word; other data: VQA
    normalisation, exact match against any reference and VQA soft accuracy) and, with ``likelihoods``
    (candidate -> log-likelihood), the likelihood choice scored the same way.

    ``correct`` is the headline outcome (easy-vqa's match, else exact match); ``lik_margin`` is the log-prob
    gap between the best and second-best candidates (near-ties can flip between CPUs and backends).
    """
    refs = list(q.references)
    rec: dict[str, Any] = {"key": q.key, "index": q.index,
                           "image_id": q.image_id, "question": q.question, "gold": q.answer, "type": q.qtype,
                           "output": output}  # fmt: skip
    if len(refs) > 1:
        rec["answers"] = refs
    if data.kind == "easy-vqa":
        rec["prediction"] = normalize_answer(output)
        rec["correct"] = rec["prediction"] == q.answer
    else:
        rec["prediction"] = vqa_normalize(output)
        gold = {vqa_normalize(r) for r in refs}
        rec["correct"] = rec["prediction"] in gold
        rec["vqa_accuracy"] = vqa_accuracy(rec["prediction"], refs)
    rec["lik_prediction"] = rec["lik_correct"] = rec["lik_margin"] = None
    if likelihoods:
        ranked = sorted(likelihoods.items(), key=lambda kv: -kv[1])
        choice = ranked[0][0]
        rec["lik_prediction"] = choice
        if data.kind == "easy-vqa":
            rec["lik_correct"] = choice == q.answer
        else:
            rec["lik_correct"] = vqa_normalize(choice) in {vqa_normalize(r) for r in refs}
        rec["lik_margin"] = ranked[0][1] - ranked[1][1] if len(ranked) > 1 else None
        rec["likelihoods"] = {k: round(v, 4) for k, v in likelihoods.items()}
    return rec


def summarize(records: Iterable[Mapping[str, Any]], kind: str = "easy-vqa") -> dict[str, Any]:
    """Accuracy overall and per question type, by generation (``correct``; open data also ``vqa_accuracy``)
    and by likelihood over the questions with a closed answer set (``likelihood``)."""
    rows = list(records)
    out = _tally(rows)
    out["unparsed"] = sum(r["prediction"] is None for r in rows)
    types = QUESTION_TYPES if kind == "easy-vqa" else tuple(dict.fromkeys(r["type"] for r in rows))
    out["by_type"] = {t: _tally([r for r in rows if r["type"] == t]) for t in types}
    return out


def _tally(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    correct = sum(bool(r["correct"]) for r in rows)
    out: dict[str, Any] = {"n": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else None}
    if rows and "vqa_accuracy" in rows[0]:
        out["vqa_accuracy"] = sum(r["vqa_accuracy"] for r in rows) / len(rows)
    scored = [r for r in rows if r.get("lik_correct") is not None]
    lik = sum(bool(r["lik_correct"]) for r in scored)
    out["likelihood"] = {"n": len(scored), "correct": lik, "accuracy": lik / len(scored) if scored else None}
    return out


# --- open-ended answers: the VQAv2 protocol ---------------------------------------------------------
# The VQA evaluation's answer normalisation (Antol et al. 2015; the official VQA eval script, which
# lmms-eval's VQAv2/TextVQA tasks use): punctuation stripped or spaced, number words to digits, articles
# dropped, common contractions restored.
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id": "I'd", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "shant": "shan't", "shed": "she'd",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's",
    "someones": "someone's", "somethings": "something's", "thats": "that's", "thered": "there'd",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "wed": "wed", "werent": "weren't", "weve": "we've",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(text: str) -> str:
    """An answer as the VQA evaluation compares it: ``"Two dogs."`` -> ``"2 dogs"``, ``"the Cat"`` ->
    ``"cat"``, ``"dont"`` -> ``"don't"``, ``"1,000"`` stays ``"1000"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    for p in _PUNCT:  # a mark next to a space, or any mark in a number like 1,000, is removed; else spaced
        text = text.replace(p, "" if (p + " " in text or " " + p in text or _DIGIT_COMMA.search(text)) else " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA soft accuracy of a normalised prediction against the raw reference answers.

    With 10 references (VQAv2), min(1, matches / 3) averaged over the ten leave-one-out subsets, as the
    official script does. With fewer, min(1, matches / min(3, n)): one reference scores 0 or 1, and
    agreeing with 3 of 5 annotators scores 1.
    """
    refs = [vqa_normalize(r) for r in references]
    if not refs:
        raise ValueError("a question needs at least one reference answer")
    if len(refs) < 10:
        return min(1.0, sum(r == prediction for r in refs) / min(3, len(refs)))
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1 :]
        scores.append(min(1.0, sum(r == prediction for r in others) / 3))
    return sum(scores) / len(scores)
