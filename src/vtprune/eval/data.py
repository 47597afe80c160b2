"""easy-vqa questions and images through the ``easy_vqa`` package API, with deterministic subsampling."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vtprune.errors import BackendUnavailableError, ConfigError
from vtprune.eval.scoring import ANSWERS, answer_type

SPLITS = ("train", "test")
INSTALL_HINT = "pip install --no-deps easy-vqa==1.0"


@dataclass(frozen=True)
class Question:
    """One easy-vqa question; ``index`` is its position in the split's ``questions.json``."""

    index: int
    question: str
    answer: str
    image_id: int
    image_path: str

    @property
    def qtype(self) -> str:
        return answer_type(self.answer)


def _easy_vqa() -> Any:
    try:
        import easy_vqa
    except ImportError:
        raise BackendUnavailableError(f"the easy-vqa data set is not installed; {INSTALL_HINT}") from None
    return easy_vqa


def load_questions(split: str) -> list[Question]:
    """Every question of ``split`` (``train`` or ``test``) in the package's order."""
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r} must be one of {', '.join(SPLITS)}")
    ev = _easy_vqa()
    if set(ev.get_answers()) != set(ANSWERS):
        raise BackendUnavailableError(f"easy_vqa's answer set differs from easy-vqa 1.0's; {INSTALL_HINT}")
    texts, answers, image_ids = ev.get_test_questions() if split == "test" else ev.get_train_questions()
    paths = ev.get_test_image_paths() if split == "test" else ev.get_train_image_paths()
    rows = enumerate(zip(texts, answers, image_ids, strict=True))
    return [Question(i, q, a, int(img), paths[img]) for i, (q, a, img) in rows]


def subsample(items: Sequence[Question], limit: int | None, seed: int) -> list[Question]:
    """``limit`` items drawn without replacement by ``random.Random(seed)``, kept in split order;
    all items when ``limit`` is None or not smaller than the split."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be a positive number of questions")
    if limit is None or limit >= len(items):
        return list(items)
    picked = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in picked]
