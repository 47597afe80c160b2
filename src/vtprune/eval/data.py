"""Evaluation data: easy-vqa through its package API, and the user's own local data sets.

A data set is a list of ``Question`` records plus how to read their images (``EvalData``). Three sources:

- ``easy-vqa`` (``load_easy_vqa``): the pocket VLM's task, scored by its first answer word; its 13 answers
  are the closed answer set for likelihood scoring.
- A JSONL file (``load_jsonl``), one object per line::

      {"image": "frames/0001.jpg", "question": "Is the door open?", "answers": ["yes"],
       "options": ["yes", "no"], "type": "door", "id": "q1"}

  ``image`` is a path relative to the file (absolute paths are read as given); ``answer`` (one string)
  may replace ``answers``; ``options`` (a closed answer set for this question), ``type`` (a label for
  the per-type breakdown) and ``id`` are optional.
- A Hugging Face ``datasets`` folder written by ``save_to_disk``, or parquet files (a file or a folder of
  them), as lmms-eval's tasks are stored (``load_hf``). Columns are found by name (``image``,
  ``question``, ``answers``/``answer``, ``options``/``choices``, ``question_type``/``type``,
  ``question_id``/``id``; VQAv2's ``answers`` list of ``{"answer": ...}`` dicts is read as well) or named
  with ``columns={"image": "img", ...}`` (``--columns image=img,...``).

A record that cannot be used stops the load with one line naming it (file and line, or row).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtprune.errors import BackendUnavailableError, ConfigError, InputError
from vtprune.eval.scoring import ANSWERS, YES_NO, answer_type

SPLITS = ("train", "test")
INSTALL_HINT = "pip install --no-deps easy-vqa==1.0"
DATASETS_HINT = "pip install 'vtprune[eval]' (the datasets package)"
COLUMNS = ("image", "question", "answers", "options", "type", "id")
_COLUMN_NAMES = {
    "image": ("image", "img", "images", "picture"),
    "question": ("question", "query", "prompt", "text"),
    "answers": ("answers", "answer", "label", "target", "gold"),
    "options": ("options", "choices"),
    "type": ("question_type", "type", "category", "answer_type"),
    "id": ("question_id", "id", "qid"),
}


@dataclass(frozen=True)
class Question:
    """One question. ``answer`` is its first reference answer, ``answers`` all of them (VQAv2 has ten);
    ``options`` a closed answer set of its own; ``type`` the label it is reported under; ``index`` its
    position in the data set; ``image_path`` None when the image lives in a dataset row."""

    index: int
    question: str
    answer: str
    image_id: int | str
    image_path: str | None
    answers: tuple[str, ...] = ()
    options: tuple[str, ...] | None = None
    type: str | None = None
    id: str | None = None

    @property
    def key(self) -> str:
        """The question's identity in result files: its id, or its position in the data set."""
        return self.id if self.id is not None else str(self.index)

    @property
    def references(self) -> tuple[str, ...]:
        return self.answers or (self.answer,)

    @property
    def qtype(self) -> str:
        return self.type if self.type is not None else answer_type(self.answer)


@dataclass
class EvalData:
    """Questions plus how to read their images. ``kind`` is ``easy-vqa`` (first-answer-word scoring) or
    ``open`` (the VQA protocol); ``answer_set`` is a closed set every question may be scored against by
    likelihood (easy-vqa's 13 answers)."""

    name: str
    kind: str
    questions: list[Question]
    answer_set: tuple[str, ...] | None = None
    image_reader: Callable[[Question], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def image(self, q: Question, min_side: int) -> Any:
        from vtprune.images import check_image_size, load_image, to_rgb

        if self.image_reader is None:
            return load_image(q.image_path, min_side)
        image = to_rgb(self.image_reader(q))
        check_image_size(image, min_side, f"image of {self.name} {q.image_id}")
        return image

    def candidates(self, q: Question) -> tuple[str, ...] | None:
        """The closed answer set ``q`` is scored against by likelihood: its own options, the data set's
        answer set, or yes/no when every reference is yes or no; None when it has none."""
        if q.options:
            return q.options
        if self.answer_set:
            return self.answer_set
        if all(r.strip().lower() in YES_NO for r in q.references):
            return YES_NO
        return None


# --- easy-vqa ------------------------------------------------------------------------------------------
def _easy_vqa() -> Any:
    try:
        import easy_vqa
    except ImportError:
        raise BackendUnavailableError(f"the easy-vqa data set is not installed; {INSTALL_HINT}") from None
    return easy_vqa


def load_questions(split: str) -> list[Question]:
    """Every easy-vqa question of ``split`` (``train`` or ``test``) in the package's order."""
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r} must be one of {', '.join(SPLITS)}")
    ev = _easy_vqa()
    if set(ev.get_answers()) != set(ANSWERS):
        raise BackendUnavailableError(f"easy_vqa's answer set differs from easy-vqa 1.0's; {INSTALL_HINT}")
    texts, answers, image_ids = ev.get_test_questions() if split == "test" else ev.get_train_questions()
    paths = ev.get_test_image_paths() if split == "test" else ev.get_train_image_paths()
    rows = enumerate(zip(texts, answers, image_ids, strict=True))
    return [Question(i, q, a, int(img), paths[img], type=answer_type(a)) for i, (q, a, img) in rows]


def load_easy_vqa(split: str, limit: int | None = None, seed: int = 0) -> EvalData:
    return EvalData(f"easy-vqa {split}", "easy-vqa", subsample(load_questions(split), limit, seed), ANSWERS,
                    info={"source": "easy-vqa", "split": split})  # fmt: skip


def subsample(items: Sequence[Question], limit: int | None, seed: int) -> list[Question]:
    """``limit`` items drawn without replacement by ``random.Random(seed)``, kept in split order;
    all items when ``limit`` is None or not smaller than the split."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be a positive number of questions")
    if limit is None or limit >= len(items):
        return list(items)
    picked = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in picked]


# --- the user's data -----------------------------------------------------------------------------------
def load_data(
    path: str | Path, limit: int | None = None, seed: int = 0, columns: Mapping[str, str] | None = None
) -> EvalData:
    """A local data set: a ``.jsonl`` file, a ``save_to_disk`` folder, or parquet files."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"--data {p} does not exist")
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        if columns:
            raise ConfigError("--columns applies to datasets folders and parquet files, not to JSONL")
        data = load_jsonl(p)
    elif p.is_dir() or p.suffix == ".parquet":
        data = load_hf(p, columns)
    else:
        raise InputError(f"--data {p}: expected a .jsonl file, a datasets folder (save_to_disk) or parquet")
    data.questions = subsample(data.questions, limit, seed)
    return data


def load_jsonl(path: Path) -> EvalData:
    """Questions of a JSONL file (see the module docstring); images relative to the file."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{where}: expected a JSON object with image, question and answers")
            image = rec.get("image")
            if not isinstance(image, str) or not image:
                raise InputError(f"{where}: 'image' must be a path to the image (relative to the file)")
            image_path = (path.parent / image) if not Path(image).is_absolute() else Path(image)
            if not image_path.is_file():
                raise InputError(f"{where}: image {image_path} does not exist")
            q = _question(rec, len(questions), where, str(image_path), image)
            questions.append(q)
    if not questions:
        raise InputError(f"{path}: no records")
    return EvalData(str(path), "open", questions, info={"source": "jsonl", "path": str(path)})


def _question(rec: Mapping[str, Any], index: int, where: str, image_path: str | None, image_id: Any) -> Question:
    question = rec.get("question")
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: 'question' must be a non-empty string")
    answers = _answers(rec.get("answers", rec.get("answer")), where)
    options = rec.get("options")
    if options is not None:
        if not (isinstance(options, list | tuple) and len(options) >= 2
                and all(isinstance(o, str) and o.strip() for o in options)):  # fmt: skip
            raise InputError(f"{where}: 'options' must be a list of at least two answer strings")
        options = tuple(options)
    qtype = rec.get("type")
    if qtype is not None and not isinstance(qtype, str):
        raise InputError(f"{where}: 'type' must be a string")
    if qtype is None:
        qtype = "yes/no" if all(a.strip().lower() in YES_NO for a in answers) else "other"
    qid = rec.get("id")
    return Question(index, question, answers[0], image_id, image_path, answers, options, qtype,
                    None if qid is None else str(qid))  # fmt: skip


def _answers(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple) and value and all(isinstance(v, dict) and "answer" in v for v in value):
        value = [v["answer"] for v in value]  # VQAv2: [{"answer": ..., "answer_confidence": ...}, ...]
    if not (isinstance(value, list | tuple) and value and all(isinstance(v, str) and v.strip() for v in value)):
        raise InputError(f"{where}: 'answers' must be a reference answer or a non-empty list of them")
    return tuple(value)


def load_hf(path: Path, columns: Mapping[str, str] | None = None) -> EvalData:
    """Questions of a ``save_to_disk`` folder or parquet files, images decoded from the image column."""
    try:
        import datasets
    except ImportError:
        raise BackendUnavailableError(f"--data {path} needs the datasets package; {DATASETS_HINT}") from None
    if path.is_dir() and not any(path.glob("*.parquet")):
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise InputError(f"--data {path} is neither a datasets folder (save_to_disk) nor parquet: {exc}") from None
        if isinstance(ds, datasets.DatasetDict):
            if len(ds) != 1:
                raise InputError(f"--data {path} holds splits {', '.join(ds)}; point --data at one of them")
            ds = next(iter(ds.values()))
    else:
        files = sorted(str(f) for f in path.glob("*.parquet")) if path.is_dir() else [str(path)]
        ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=None,
                                   download_mode="reuse_dataset_if_exists")  # fmt: skip
    cols = _columns(ds.column_names, columns, path)
    meta = ds.remove_columns([cols["image"]])  # questions without decoding every image
    questions = []
    for i, row in enumerate(meta):
        rec = {k: row[c] for k, c in cols.items() if k != "image" and c is not None}
        questions.append(_question(rec, i, f"{path} row {i}", None, i))
    if not questions:
        raise InputError(f"{path}: no rows")
    image_col = cols["image"]

    def read(q: Question) -> Any:
        image = ds[int(q.image_id)][image_col]
        if isinstance(image, dict) and image.get("bytes"):  # an undecoded Image feature
            import io

            from PIL import Image

            return Image.open(io.BytesIO(image["bytes"]))
        if not hasattr(image, "convert"):
            raise InputError(f"{path} row {q.image_id}: column {image_col!r} holds no image")
        return image

    info = {"source": "datasets", "path": str(path), "columns": cols}
    return EvalData(str(path), "open", questions, image_reader=read, info=info)


def _columns(names: Sequence[str], given: Mapping[str, str] | None, path: Path) -> dict[str, str | None]:
    given = dict(given or {})
    unknown = set(given) - set(COLUMNS)
    if unknown:
        raise ConfigError(f"--columns: unknown field(s) {', '.join(sorted(unknown))}; fields are {', '.join(COLUMNS)}")
    out: dict[str, str | None] = {}
    for key in COLUMNS:
        if key in given:
            if given[key] not in names:
                raise InputError(f"--columns {key}={given[key]}: {path} has no such column ({', '.join(names)})")
            out[key] = given[key]
        else:
            out[key] = next((c for c in _COLUMN_NAMES[key] if c in names), None)
    for key in ("image", "question", "answers"):
        if out[key] is None:
            raise InputError(f"{path}: no {key} column among {', '.join(names)}; name it with --columns {key}=COLUMN")
    return out


def parse_columns(text: str | None) -> dict[str, str]:
    """``image=img,question=q`` -> {"image": "img", "question": "q"}."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--columns {text!r}: expected FIELD=COLUMN pairs separated by commas")
        out[key.strip()] = value.strip()
    return out
