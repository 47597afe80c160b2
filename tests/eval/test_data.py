"""The user's data sets (JSONL, datasets folders, parquet), the VQA protocol's scoring, likelihood scoring
of closed answer sets, and ``vtprune eval`` on them: PyTorch and a bundle give the same per-question
outcomes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vtprune.errors import ConfigError, InputError
from vtprune.eval.data import EvalData, Question, load_data, parse_columns
from vtprune.eval.scoring import score_record, vqa_accuracy, vqa_normalize

HAS_DATASETS = importlib.util.find_spec("datasets") is not None
needs_datasets = pytest.mark.skipif(not HAS_DATASETS, reason="datasets not installed; pip install 'vtprune[eval]'")
HAS_EASY_VQA = importlib.util.find_spec("easy_vqa") is not None


# --- the VQA protocol (pure) ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [("Two dogs.", "2 dogs"), ("the Cat", "cat"), ("dont", "don't"), ("1,000", "1000"), ("Yes!", "yes"),
     ("a red-car", "red car"), ("3.5", "3.5"), ("  A\tbanana\n", "banana"), ("none", "0")],
)  # fmt: skip
def test_vqa_normalize(text: str, expected: str) -> None:
    assert vqa_normalize(text) == expected


def test_vqa_accuracy_follows_the_protocol() -> None:
    ten = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("2", ten) == pytest.approx(0.9)  # 3 of 10 agree: 7 subsets give 1, 3 give 2/3
    assert vqa_accuracy("2", ["two"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("3", ten) == 1.0 and vqa_accuracy("4", ten) == 0.0
    assert vqa_accuracy("yes", ["Yes"]) == 1.0 and vqa_accuracy("no", ["Yes"]) == 0.0
    assert vqa_accuracy("cat", ["cat", "dog", "cat", "cat", "dog"]) == 1.0
    assert vqa_accuracy("dog", ["cat", "dog", "cat", "cat", "dog"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_score_record_open_and_closed() -> None:
    data = EvalData("d", "open", [])
    q = Question(0, "How many dogs?", "two", 0, "x.png", ("two", "2", "3"), None, "count", "q0")
    rec = score_record(data, q, "Two.", None)
    assert rec["key"] == "q0" and rec["prediction"] == "2" and rec["correct"] and rec["vqa_accuracy"] == 2 / 3
    assert rec["lik_correct"] is None
    rec = score_record(data, q, "three dogs", {"2": -0.1, "3": -2.0, "4": -3.0})
    assert not rec["correct"] and rec["lik_prediction"] == "2" and rec["lik_correct"]
    assert rec["lik_margin"] == pytest.approx(1.9)


# --- loading the user's data -----------------------------------------------------------------------------
def _photos() -> list[Path]:
    """A handful of real photos (matplotlib's sample data, installed with the dev extras)."""
    mpl = pytest.importorskip("matplotlib")
    root = Path(mpl.get_data_path()) / "sample_data"
    photos = [root / "grace_hopper.jpg", root / "Minduka_Present_Blue_Pack.png"]
    if not all(p.is_file() for p in photos):
        pytest.skip("matplotlib's sample photos are not installed")
    return photos


def _records(tmp_path: Path) -> list[dict]:
    """Four easy-vqa test questions and two about photos, images copied under tmp_path/images."""
    import shutil

    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    recs = []
    if HAS_EASY_VQA:
        from vtprune.eval.data import load_questions

        for q in load_questions("test")[:4]:
            dst = img_dir / f"ev{q.index}.png"
            shutil.copy(q.image_path, dst)
            recs.append({"image": f"images/{dst.name}", "question": q.question, "answers": [q.answer],
                         "type": q.qtype, "id": f"ev{q.index}"})  # fmt: skip
    hopper, pack = _photos()
    shutil.copy(hopper, img_dir / hopper.name)
    shutil.copy(pack, img_dir / pack.name)
    recs.append({"image": f"images/{hopper.name}", "question": "is there a person in the picture?",
                 "answer": "yes", "id": "hopper"})  # fmt: skip
    recs.append({"image": f"images/{pack.name}", "question": "what is the color of the pack?",
                 "answers": [{"answer": "blue"}] * 3 + [{"answer": "teal"}], "options": ["blue", "red", "green"],
                 "type": "color", "id": "pack"})  # fmt: skip
    return recs


def _write_jsonl(tmp_path: Path, recs: list[dict]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_jsonl_loads_with_defaults(tmp_path: Path) -> None:
    data = load_data(_write_jsonl(tmp_path, _records(tmp_path)))
    by_id = {q.id: q for q in data.questions}
    assert data.kind == "open" and len(data.questions) == len(by_id)
    hopper, pack = by_id["hopper"], by_id["pack"]
    assert hopper.type == "yes/no" and hopper.references == ("yes",) and data.candidates(hopper) == ("yes", "no")
    assert pack.references == ("blue", "blue", "blue", "teal") and data.candidates(pack) == ("blue", "red", "green")
    assert Path(pack.image_path).is_file() and data.image(pack, 14).size[0] > 14
    assert load_data(data.name, limit=2, seed=0).questions == load_data(data.name, limit=2, seed=0).questions


@pytest.mark.parametrize(
    ("line", "message"),
    [("not json", "line 2: not JSON"), ('["a"]', "line 2: expected a JSON object"),
     ('{"question": "q", "answer": "a"}', "line 2: 'image' must be a path"),
     ('{"image": "missing.png", "question": "q", "answer": "a"}', "line 2: image .*missing.png does not exist"),
     ('{"image": "ok.png", "question": "", "answer": "a"}', "line 2: 'question' must be a non-empty string"),
     ('{"image": "ok.png", "question": "q"}', "line 2: 'answers' must be"),
     ('{"image": "ok.png", "question": "q", "answers": []}', "line 2: 'answers' must be"),
     ('{"image": "ok.png", "question": "q", "answer": "a", "options": ["a"]}', "line 2: 'options' must be"),
     ('{"image": "ok.png", "question": "q", "answer": "a", "type": 3}', "line 2: 'type' must be a string")],
)  # fmt: skip
def test_bad_jsonl_records_name_the_line(tmp_path: Path, scene, line: str, message: str) -> None:
    scene.save(tmp_path / "ok.png")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "ok.png", "question": "q", "answer": "a"}\n' + line + "\n")
    with pytest.raises(InputError, match=message):
        load_data(path)


def test_bad_data_paths_and_columns(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_data(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="expected a .jsonl file"):
        load_data(tmp_path / "x.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no records"):
        load_data(tmp_path / "empty.jsonl")
    assert parse_columns("image=img, question=q") == {"image": "img", "question": "q"}
    with pytest.raises(ConfigError, match="FIELD=COLUMN"):
        parse_columns("image")


def _save_datasets(tmp_path: Path, recs: list[dict], rename: dict[str, str] | None = None) -> tuple[Path, Path]:
    """The records as a save_to_disk folder and as a parquet file (images embedded)."""
    import datasets
    from PIL import Image

    rename = rename or {}
    rows = {rename.get(k, k): [] for k in ("image", "question", "answers", "options", "type", "question_id")}
    for r in recs:
        answers = r.get("answers", [r.get("answer")])
        rows[rename.get("image", "image")].append(Image.open(tmp_path / r["image"]).convert("RGB"))
        rows[rename.get("question", "question")].append(r["question"])
        rows[rename.get("answers", "answers")].append([a["answer"] if isinstance(a, dict) else a for a in answers])
        rows[rename.get("options", "options")].append(r.get("options"))
        rows[rename.get("type", "type")].append(r.get("type"))
        rows[rename.get("question_id", "question_id")].append(r["id"])
    ds = datasets.Dataset.from_dict(rows).cast_column(rename.get("image", "image"), datasets.Image())
    folder, parquet = tmp_path / "saved", tmp_path / "parquet" / "test-00000.parquet"
    ds.save_to_disk(str(folder))
    parquet.parent.mkdir()
    ds.to_parquet(str(parquet))
    return folder, parquet


@needs_datasets
def test_datasets_folder_and_parquet_load_like_jsonl(tmp_path: Path) -> None:
    recs = _records(tmp_path)
    jsonl = load_data(_write_jsonl(tmp_path, recs))
    folder, parquet = _save_datasets(tmp_path, recs)
    for source in (folder, parquet, parquet.parent):
        data = load_data(source)
        assert [(q.id, q.question, q.references, q.options, q.type) for q in data.questions] == [
            (q.id, q.question, q.references, q.options, q.type) for q in jsonl.questions]
        img = np.asarray(data.image(data.questions[-1], 14))
        assert img.shape == np.asarray(jsonl.image(jsonl.questions[-1], 14)).shape


@needs_datasets
def test_datasets_columns_by_name_or_flag(tmp_path: Path) -> None:
    recs = _records(tmp_path)
    folder, _ = _save_datasets(tmp_path, recs, {"image": "frame", "question": "prompt_text"})
    with pytest.raises(InputError, match="no image column .*--columns image=COLUMN"):
        load_data(folder)
    data = load_data(folder, columns={"image": "frame", "question": "prompt_text"})
    assert len(data.questions) == len(recs) and data.info["columns"]["image"] == "frame"
    with pytest.raises(InputError, match="--columns image=nope: .* has no such column"):
        load_data(folder, columns={"image": "nope", "question": "prompt_text"})
    with pytest.raises(ConfigError, match="unknown field"):
        load_data(folder, columns={"picture": "frame"})


# --- likelihood scoring ------------------------------------------------------------------------------------
def test_candidate_scores_match_teacher_forcing(tiny_dirs, scene) -> None:
    """Candidate log-likelihoods from the prompt's state equal those of one forward pass over prompt +
    answer, and the greedy answer is unchanged by scoring (the state is rewound)."""
    import torch

    from vtprune.config import PruneConfig
    from vtprune.models import load_vlm
    from vtprune.runtime.generate import generate
    from vtprune.runtime.pipeline import PrunedVlm

    adapter = load_vlm(str(tiny_dirs["tiny-llava"]))
    for cfg in (PruneConfig(), PruneConfig(method="alvts", keep=4, layer=1)):
        pipe = PrunedVlm(adapter, cfg)
        cands = [[5, 7, 9], [5, 7], [5, 8], [11]]
        plain = generate(pipe, scene, "what is this?", 6)
        scored = generate(pipe, scene, "what is this?", 6, candidates=cands)
        assert scored.token_ids == plain.token_ids and plain.candidate_logprobs is None
        with torch.inference_mode():
            prefill = pipe.build_prefill(pipe.inputs(scene, "what is this?"))
            for cand, got in zip(cands, scored.candidate_logprobs, strict=True):
                logits, state = pipe.first_logits(prefill)
                pos, total = pipe.next_position(prefill), 0.0
                for i, tok in enumerate(cand):
                    total += float(torch.log_softmax(torch.as_tensor(logits).double().reshape(-1), -1)[tok])
                    logits, state = pipe.next_logits(tok, pos + i, state)
                assert got == pytest.approx(total, abs=1e-4)


# --- vtprune eval on the user's data: PyTorch and the bundle agree -----------------------------------------
def _eval(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vtprune.cli", "eval", *argv, "--no-progress"],
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def _eval_here(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """``vtprune eval`` in this process (no model reload per run); its stdout."""
    from vtprune.cli import _Parser
    from vtprune.eval.cli import add_eval_command, cmd_eval

    parser = _Parser(prog="vtprune")
    add_eval_command(parser.add_subparsers(dest="command", parser_class=_Parser))
    capsys.readouterr()
    assert cmd_eval(parser.parse_args(["eval", *argv, "--no-progress"])) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def uniform_bundle(pocket_cache: Path, pocket_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pocket VLM with uniform pruning at 64 tokens: integer scores, so PyTorch and ONNX Runtime keep
    the same tokens on any CPU (no near-ties); its language-model graphs are the G-Prune bundle's."""
    from vtprune.api import export_bundle
    from vtprune.config import PruneConfig
    from vtprune.export.bundle import ExportConfig

    out = tmp_path_factory.mktemp("pocket-uniform") / "k64"
    export_bundle("pocket", PruneConfig(method="uniform", keep=64), ExportConfig(reuse_lm_from=str(pocket_bundle)),
                  out, pocket_cache)  # fmt: skip
    return out


@pytest.mark.skipif(not (HAS_DATASETS and HAS_EASY_VQA), reason="needs datasets and easy-vqa")
def test_pocket_eval_on_user_data_pytorch_and_bundle(
    tmp_path: Path, pocket_cache: Path, uniform_bundle: Path, capsys: pytest.CaptureFixture
) -> None:
    recs = _records(tmp_path)
    jsonl = _write_jsonl(tmp_path, recs)
    folder, _ = _save_datasets(tmp_path, recs)
    results = {}
    torch_args = ["--model", "pocket", "--cache-dir", str(pocket_cache), "--method", "uniform", "--keep", "64"]
    for name, argv in {
        "torch-jsonl": [*torch_args, "--data", str(jsonl)],
        "bundle-jsonl": [str(uniform_bundle), "--data", str(jsonl)],
        "bundle-saved": [str(uniform_bundle), "--data", str(folder)],
    }.items():
        out = tmp_path / f"{name}.json"
        stdout = _eval_here([*argv, "--json", str(out), "--items", str(tmp_path / f"{name}.jsonl")], capsys)
        assert "likelihood" in stdout
        results[name] = json.loads(out.read_text())
        lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(x)["key"] for x in lines] == [r["id"] for r in recs]
    ref = results["torch-jsonl"]
    data = load_data(jsonl)  # open data: scored by likelihood only where there is a closed answer set
    closed = [q for q in data.questions if data.candidates(q) is not None]
    assert ref["complete"] and ref["n"] == len(recs) and ref["likelihood"]["n"] == len(closed) >= 2
    assert ref["by_type"]["color"]["likelihood"]["n"] >= 1
    for name in ("bundle-jsonl", "bundle-saved"):
        for a, b in zip(ref["items"], results[name]["items"], strict=True):
            assert (a["key"], a["output"], a["correct"]) == (b["key"], b["output"], b["correct"]), name
            assert (a["lik_margin"] is None) == (b["lik_margin"] is None)
            if a["lik_margin"] is not None and min(a["lik_margin"], b["lik_margin"]) > 1e-3:  # near-ties may flip
                assert a["lik_prediction"] == b["lik_prediction"], (name, a["key"])


def test_eval_command_refusals(tmp_path: Path, cache_dir: Path, scene) -> None:
    scene.save(tmp_path / "ok.png")
    data = tmp_path / "d.jsonl"
    data.write_text('{"image": "ok.png", "question": "is it red?", "answer": "yes"}\n')
    cases = [
        ([str(tmp_path), "--keep", "64"], "a bundle's model and pruning are fixed at export"),
        (["--model", "tiny-llava", "--provider", "cuda"], "are for a bundle"),
        (["--model", "tiny-llava", "--resume"], "--resume continues a --json result"),
        (["--model", "tiny-llava", "--cache-dir", str(cache_dir), "--data", str(tmp_path / "x.jsonl")],
         "does not exist"),
    ]  # fmt: skip
    for argv, message in cases:
        proc = _eval(argv)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_eval_resume_continues_and_checks_settings(tmp_path: Path, cache_dir: Path, scene) -> None:
    scene.save(tmp_path / "ok.png")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"image": "ok.png", "question": f"is it red? {i}", "answer": "yes",
                                        "id": f"q{i}"}) + "\n" for i in range(4)))  # fmt: skip
    out = tmp_path / "r.json"
    base = ["--model", "tiny-llava", "--cache-dir", str(cache_dir), "--data", str(data), "--json", str(out)]
    assert _eval(base).returncode == 0
    full = json.loads(out.read_text())
    partial = full | {"complete": False, "items": full["items"][:2]}
    for k in ("n", "accuracy"):
        partial.pop(k)
    out.write_text(json.dumps(partial))
    proc = _eval([*base, "--resume"])
    assert proc.returncode == 0 and "resumed 2 answered questions" in proc.stdout, proc.stderr
    resumed = json.loads(out.read_text())
    assert resumed["complete"] and resumed["resumed"] == 2
    assert [r["output"] for r in resumed["items"]] == [r["output"] for r in full["items"]]
    proc = _eval([*base, "--resume", "--keep", "8"])
    assert proc.returncode == 2 and "other settings (prune)" in proc.stderr
    proc = _eval(base)
    assert proc.returncode == 2 and "already exists; pass --force" in proc.stderr
