"""CLI for the in-LLM methods: run/eval flags, ``vtprune calib alvts``, and export's refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import assert_user_error, run_main
from vtprune.config import PruneConfig


@pytest.mark.parametrize("extra", [["--method", "alvts", "--keep", "8", "--layer", "1", "--rank", "8"],
                                   ["--method", "alvts", "--keep", "8", "--layer", "1", "--skip", "kv",
                                    "--query", "instruction", "--selector", "exact"],
                                   ["--method", "fastv", "--keep", "8", "--layer", "1"],
                                   ["--method", "dart", "--keep", "0.125", "--layer", "1"]],
                         ids=["alvts", "alvts-variant", "fastv", "dart"])  # fmt: skip
def test_run_in_llm_methods(extra, cache_dir: Path, png: Path, capsys) -> None:
    capsys.readouterr()
    rc = run_main(["run", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--image", str(png),
                   "--prompt", "what color ?", "--max-new-tokens", "2", "--json", *extra])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    assert result["method"] == extra[1] and result["layer_visual_tokens"] == [64, 8]
    assert result["visual_tokens_kept"] == 8 and result["prefill_tokens"] == result["prompt_tokens"]
    assert result["flops"]["prefill_macs_pruned"] < result["flops"]["prefill_macs_unpruned"]


@pytest.mark.parametrize("extra, fragments", [
    (["--method", "fastv", "--keep", "8", "--layer", "0"], ("--layer 0", "needs --layer >= 1")),
    (["--method", "alvts", "--keep", "8", "--rank", "0"], ("--rank 0",)),
    (["--method", "alvts", "--keep", "8", "--layer", "1", "--factors", "/nonexistent"],
     ("not a 'vtprune calib alvts' output",)),
])  # fmt: skip
def test_in_llm_user_errors(extra, fragments, cache_dir: Path, png: Path, capsys) -> None:
    capsys.readouterr()
    rc = run_main(["run", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--image", str(png),
                   "--prompt", "what ?", *extra])  # fmt: skip
    assert_user_error(rc, *capsys.readouterr(), fragments)


def test_export_refuses_the_exact_selector(cache_dir: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    out = tmp_path / "bundle"
    rc = run_main(["export", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--out", str(out),
                   "--method", "alvts", "--keep", "8", "--layer", "1", "--selector", "exact"])  # fmt: skip
    assert_user_error(rc, *capsys.readouterr(), ("--selector lowrank",))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_default_alvts_layer_beyond_a_tiny_model_is_a_user_error(cache_dir: Path, png: Path, capsys) -> None:
    capsys.readouterr()
    rc = run_main(["run", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--image", str(png),
                   "--prompt", "what ?", "--method", "alvts", "--keep", "8"])  # fmt: skip
    default = f"--layer {PruneConfig('alvts', 8).layer}"
    assert_user_error(rc, *capsys.readouterr(), (default, "2 decoder layers", "--layer below 2"))


def test_calib_alvts_end_to_end(cache_dir: Path, tmp_path: Path, scene, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        scene.rotate(90 * i).save(images / f"{i}.png")
    (images / "questions.json").write_text(json.dumps({"0.png": "what color is the shape ?"}))
    out = tmp_path / "factors"
    argv = ["calib", "alvts", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--data", str(images),
            "--n", "4", "--keep", "4", "--out", str(out)]  # fmt: skip
    capsys.readouterr()
    assert run_main(argv) == 0
    table, _ = capsys.readouterr()
    assert "recall@4" in table and "mean recall" in table
    card = json.loads((out / "card.json").read_text())
    assert card["pairs"] == {"fit": 3, "heldout": 1} and card["data"] == str(images)
    assert_user_error(run_main(argv), *capsys.readouterr(), ("exists; pass --force",))
    assert run_main([*argv, "--force"]) == 0
    capsys.readouterr()
    png = tmp_path / "q.png"
    scene.save(png)
    rc = run_main(["run", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--image", str(png), "--prompt",
                   "what ?", "--method", "alvts", "--keep", "4", "--layer", "1", "--factors", str(out),
                   "--json"])  # fmt: skip
    assert rc == 0 and json.loads(capsys.readouterr()[0])["layer_visual_tokens"] == [64, 4]
    assert_user_error(run_main(["calib", "alvts", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--data",
                                str(tmp_path / "nope"), "--out", str(tmp_path / "f2")]), *capsys.readouterr(),
                      ("neither 'easy-vqa' nor a directory",))  # fmt: skip
    paper = tmp_path / "paper"
    assert run_main([*argv[:-2], "--out", str(paper), "--mode", "paper", "--rank", "4", "--steps", "2"]) == 0
    assert "spearman svd -> tuned" in capsys.readouterr()[0]
    run = ["run", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--image", str(png), "--prompt", "what ?",
           "--method", "alvts", "--keep", "4", "--layer", "0", "--factors", str(paper), "--json"]  # fmt: skip
    assert run_main([*run, "--selector", "paper"]) == 0
    assert json.loads(capsys.readouterr()[0])["layer_visual_tokens"] == [4, 4]
    assert_user_error(run_main(run), *capsys.readouterr(), ("use them with --selector paper",))
    assert_user_error(run_main([*argv[:-2], "--out", str(tmp_path / "f3"), "--mode", "paper", "--lr", "2"]),
                      *capsys.readouterr(), ("--lr 2",))  # fmt: skip
