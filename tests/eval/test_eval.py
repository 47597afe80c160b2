"""easy-vqa harness: normalisation and scoring (pure), data access and subsampling, the ``eval`` command
on a tiny random model, and a small end-to-end eval of the pocket VLM (needs the pinned wheels)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from vtprune.config import PruneConfig
from vtprune.errors import ConfigError
from vtprune.eval.data import Question, subsample
from vtprune.eval.scoring import ANSWERS, answer_type, is_correct, normalize_answer, summarize
from vtprune.models import pocket

HAS_EASY_VQA = importlib.util.find_spec("easy_vqa") is not None
needs_easy_vqa = pytest.mark.skipif(
    not HAS_EASY_VQA, reason="easy-vqa not installed; pip install --no-deps easy-vqa==1.0"
)
TEXT_ONLY_BASELINE = 0.31  # OFFLINE_WEIGHTS.md §6: the untrained-projector model on 200 test questions


# --- normalisation and scoring (pure) ------------------------------------------------------------
@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("circle", "circle"),
        ("Circle.", "circle"),
        ("  YES!", "yes"),
        ("No, there is not a blue shape", "no"),
        ("The shape is a triangle.", "triangle"),
        ("The red shape is a circle", "red"),  # the first answer word wins
        ("two rectangles", "rectangle"),  # plural
        ("It is grey", "gray"),  # alias
        ("teal-colored", "teal"),  # punctuation splits words
        ("The image contains a", None),
        ("", None),
        ("yesterday", None),  # whole words only
        ("nose", None),
    ],
)
def test_normalize_answer(output: str, expected: str | None) -> None:
    assert normalize_answer(output) == expected


def test_answer_set_and_types() -> None:
    assert len(ANSWERS) == len(set(ANSWERS)) == 13
    types = {a: answer_type(a) for a in ANSWERS}
    assert [a for a, t in types.items() if t == "yes/no"] == ["yes", "no"]
    assert [a for a, t in types.items() if t == "shape"] == ["circle", "rectangle", "triangle"]
    assert sum(t == "color" for t in types.values()) == 8
    with pytest.raises(ValueError):
        answer_type("square")


def test_is_correct_is_exact_match_after_normalisation() -> None:
    assert is_correct("Blue.", "blue") and not is_correct("blue", "teal") and not is_correct("", "no")


def test_summarize_per_type() -> None:
    rows = [
        {"type": "yes/no", "prediction": "yes", "correct": True, "lik_correct": True},
        {"type": "yes/no", "prediction": None, "correct": False, "lik_correct": True},
        {"type": "shape", "prediction": "circle", "correct": True, "lik_correct": None},
        {"type": "color", "prediction": "blue", "correct": False, "lik_correct": False},
    ]
    s = summarize(rows)
    assert (s["n"], s["correct"], s["accuracy"], s["unparsed"]) == (4, 2, 0.5, 1)
    assert s["likelihood"] == {"n": 3, "correct": 2, "accuracy": 2 / 3}
    assert s["by_type"]["yes/no"] == {"n": 2, "correct": 1, "accuracy": 0.5,
                                      "likelihood": {"n": 2, "correct": 2, "accuracy": 1.0}}  # fmt: skip
    assert s["by_type"]["shape"]["accuracy"] == 1.0 and s["by_type"]["color"]["accuracy"] == 0.0
    assert summarize([])["by_type"]["shape"] == {"n": 0, "correct": 0, "accuracy": None,
                                                 "likelihood": {"n": 0, "correct": 0, "accuracy": None}}  # fmt: skip


def test_subsample_is_deterministic_and_ordered() -> None:
    items = [Question(i, f"q{i}", "yes", i, f"{i}.png") for i in range(100)]
    a, b = subsample(items, 10, seed=3), subsample(items, 10, seed=3)
    assert a == b and len(a) == 10 and [q.index for q in a] == sorted(q.index for q in a)
    assert subsample(items, 10, seed=4) != a
    assert subsample(items, None, 0) == items == subsample(items, 1000, 0)
    with pytest.raises(ConfigError, match="--limit 0"):
        subsample(items, 0, 0)


# --- data ----------------------------------------------------------------------------------------
@needs_easy_vqa
def test_easy_vqa_splits() -> None:
    from vtprune.eval.data import load_questions

    test = load_questions("test")
    assert len(test) == 9673 and {q.answer for q in test} == set(ANSWERS)
    assert Path(test[0].image_path).is_file() and test[0].index == 0
    assert len(load_questions("train")) == 38575
    with pytest.raises(ConfigError, match="--split 'val'"):
        load_questions("val")


# --- the command, on a tiny random model ---------------------------------------------------------
@needs_easy_vqa
def test_eval_command_on_tiny_model(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from vtprune.cli import _Parser
    from vtprune.eval.cli import add_eval_command, cmd_eval

    parser = _Parser(prog="vtprune")
    add_eval_command(parser.add_subparsers(dest="command", parser_class=_Parser))
    out = tmp_path / "r" / "eval.json"
    argv = ["eval", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--keep", "16", "--limit", "3",
            "--seed", "1", "--json", str(out), "--no-progress"]  # fmt: skip
    args: argparse.Namespace = parser.parse_args(argv)
    assert cmd_eval(args) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 3 and result["prune"]["method"] == "gprune"
    assert result["tokens"]["visual_tokens_kept"] == 16
    assert len(result["items"]) == 3
    assert {"question", "gold", "output", "prediction", "correct"} <= set(result["items"][0])
    assert result["flops"]["saved_fraction"] > 0 and result["time"]["wall_s"] > 0
    assert "easy-vqa test: accuracy" in capsys.readouterr().out


# --- the pocket VLM end to end (pinned wheels) ---------------------------------------------------
@pytest.fixture(scope="module")
def pocket_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The assembled pocket checkpoint, shared with tests/models/test_pocket.py through pytest's cache."""
    if pocket.missing_packages():
        pytest.skip(f"pocket wheels not installed; {pocket.INSTALL_HINT}")
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("vtprune-pocket") if cache is not None else tmp_path_factory.mktemp("pocket-cache")
    pocket.materialize(root, log=lambda _: None)
    return root


def test_pocket_eval_five_questions(pocket_cache: Path) -> None:
    from vtprune.eval import run_eval

    full = run_eval("pocket", PruneConfig(), "test", 5, 0, pocket_cache, progress=False)
    pruned = run_eval("pocket", PruneConfig(method="gprune", keep=64), "test", 5, 0, pocket_cache, progress=False)
    assert [r["index"] for r in full["items"]] == [r["index"] for r in pruned["items"]]
    assert full["tokens"]["visual_tokens_kept"] == 256 and pruned["tokens"]["visual_tokens_kept"] == 64
    assert pruned["flops"]["prefill_gflops_pruned"] < 0.5 * full["flops"]["prefill_gflops_pruned"]
    assert full["model_info"]["pocket_projector_trained"] == pocket.PROJECTOR_FILE.is_file()
    assert 0.0 <= full["accuracy"] <= 1.0 and sum(v["n"] for v in full["by_type"].values()) == 5


@pytest.mark.skipif(not pocket.PROJECTOR_FILE.is_file(), reason="no trained projector committed yet")
def test_trained_pocket_beats_text_only_baseline(pocket_cache: Path) -> None:
    from vtprune.eval import run_eval

    result = run_eval("pocket", PruneConfig(), "test", 20, 0, pocket_cache, progress=False)
    assert result["accuracy"] >= TEXT_ONLY_BASELINE + 0.3, result["accuracy"]
