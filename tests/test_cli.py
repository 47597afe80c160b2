"""``vtprune run`` through its command line: every user error is one clean line and exit code 2.

Most cases call ``vtprune.cli.main`` in-process (fast, shares the loaded libraries); two go through a
real ``python -m vtprune.cli`` subprocess to check the real entry point. Each error case also checks
that nothing was written: stdout stays empty and no file appears in the working dir, the test's tmp
dir or the model cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ERROR_LINE = re.compile(r"^vtprune( run)?: error: \S")  # argparse errors come from the ``run`` sub-parser
LLAVA_PROMPT = "USER: <image>\nwhat color ? ASSISTANT:"
QWEN_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what color ?<|im_end|>\n<|im_start|>assistant\n"
)


def run_main(argv: list[str]) -> int:
    """``vtprune.cli.main`` in-process; argparse errors exit through ``SystemExit``."""
    from vtprune.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def snapshot(*roots: Path) -> set[tuple[str, int]]:
    """Every file and directory under ``roots`` (path and size), to detect partial output."""
    seen: set[tuple[str, int]] = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath, name)
                seen.add((str(p), p.stat().st_size if p.is_file() else -1))
    return seen


def assert_user_error(rc: int, out: str, err: str, fragments: tuple[str, ...] = ()) -> None:
    assert rc == 2, f"exit code {rc}, stderr:\n{err}"
    assert out == "", f"partial output on stdout:\n{out}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"stderr is not exactly one line:\n{err}"
    assert ERROR_LINE.match(lines[0]), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


# --- inputs written per test --------------------------------------------------------------------


def write_png(path: Path, w: int, h: int) -> Path:
    from PIL import Image

    Image.new("RGB", (w, h), (200, 30, 30)).save(path)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def write_truncated_png(path: Path, src: Path) -> Path:
    data = src.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def ckpt_dir(tmp: Path, files: dict[str, str | bytes]) -> Path:
    d = tmp / "ckpt"
    d.mkdir()
    for name, content in files.items():
        (d / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return d


def tiny_copy(tmp: Path, tiny_dir: Path, drop: tuple[str, ...] = ()) -> Path:
    """A copy of a tiny checkpoint with the files in ``drop`` removed (an incomplete download)."""
    d = tmp / "ckpt"
    shutil.copytree(tiny_dir, d)
    for name in drop:
        (d / name).unlink()
    return d


def truncated_weights(tmp: Path, tiny_dir: Path) -> Path:
    d = tiny_copy(tmp, tiny_dir)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return d


def llava_config(tiny_dirs: dict[str, Path]) -> str:
    return (tiny_dirs["tiny-llava"] / "config.json").read_text()


# A case: (tmp_path, tiny_dirs, png) -> (argv after "run", fragments the error line must contain).
Case = Callable[[Path, dict[str, Path], Path], tuple[list[str], tuple[str, ...]]]


def _model(model: str, image: Path | str, *extra: str, prompt: str = "what color ?") -> list[str]:
    return ["--model", model, "--image", str(image), "--prompt", prompt, *extra]


CASES: dict[str, Case] = {
    # checkpoint directory
    "ckpt-missing": lambda t, d, p: (_model(str(t / "nope"), p), ("does not exist",)),
    "ckpt-is-file": lambda t, d, p: (_model(str(p), p), ("is a file",)),
    "ckpt-no-config": lambda t, d, p: (_model(str(ckpt_dir(t, {"model.safetensors": b"x"})), p), ("no config.json",)),
    "ckpt-config-not-json": lambda t, d, p: (
        _model(str(ckpt_dir(t, {"config.json": "{model_type: llava"})), p), ("not valid JSON",)),
    "ckpt-config-not-utf8": lambda t, d, p: (
        _model(str(ckpt_dir(t, {"config.json": b"\xff\xfe\x00garbage"})), p), ("not valid JSON",)),
    "ckpt-config-list": lambda t, d, p: (_model(str(ckpt_dir(t, {"config.json": "[1, 2]"})), p), ("model_type",)),
    "ckpt-no-model-type": lambda t, d, p: (
        _model(str(ckpt_dir(t, {"config.json": '{"architectures": ["X"]}'})), p), ("model_type",)),
    "ckpt-unsupported-bert": lambda t, d, p: (
        _model(str(ckpt_dir(t, {"config.json": '{"model_type": "bert"}'})), p),
        ("'bert' is not supported", "llava", "llava_next", "qwen2_5_vl")),
    "ckpt-model-type-not-string": lambda t, d, p: (
        _model(str(ckpt_dir(t, {"config.json": '{"model_type": ["llava"]}'})), p), ("model_type",)),
    "ckpt-pickle-only": lambda t, d, p: (
        _model(str(ckpt_dir(t, {"config.json": llava_config(d), "pytorch_model.bin": b"not a pickle"})), p),
        ("pytorch_model.bin", "--allow-pickle")),
    "ckpt-no-weights": lambda t, d, p: (
        _model(str(ckpt_dir(t, {"config.json": llava_config(d)})), p), ("no weights",)),
    "ckpt-truncated-safetensors": lambda t, d, p: (_model(str(truncated_weights(t, d["tiny-llava"])), p), ()),
    "ckpt-no-processor-config": lambda t, d, p: (
        _model(str(tiny_copy(t, d["tiny-llava"], ("processor_config.json",))), p), ()),
    "ckpt-no-tokenizer": lambda t, d, p: (
        _model(str(tiny_copy(t, d["tiny-llava"], ("tokenizer.json", "tokenizer_config.json"))), p), ()),
    # image
    "image-missing": lambda t, d, p: (_model("tiny-llava", t / "missing.png"), ("does not exist",)),
    "image-is-dir": lambda t, d, p: (_model("tiny-llava", t), ("not a file",)),
    "image-random-bytes": lambda t, d, p: (
        _model("tiny-llava", write_bytes(t / "noise.png", os.urandom(512))),
        ("cannot read image",)),
    "image-empty": lambda t, d, p: (
        _model("tiny-llava", write_bytes(t / "empty.png", b"")), ("cannot read image",)),
    "image-truncated-png": lambda t, d, p: (
        _model("tiny-llava", write_truncated_png(t / "half.png", p)), ("cannot read image",)),
    "image-too-small-llava": lambda t, d, p: (
        _model("tiny-llava", write_png(t / "s.png", 8, 8)), ("8x8", "at least 14")),
    "image-too-small-qwen": lambda t, d, p: (
        _model("tiny-qwen2.5-vl", write_png(t / "s.png", 20, 20)), ("20x20", "at least 28")),
    "image-too-thin-qwen": lambda t, d, p: (_model("tiny-qwen2.5-vl", write_png(t / "s.png", 28, 6000)), ()),
    # budget and pruning options
    "keep-zero": lambda t, d, p: (_model("tiny-llava", p, "--keep", "0"), ("--keep 0",)),
    "keep-negative": lambda t, d, p: (_model("tiny-llava", p, "--keep", "-3"), ("--keep -3",)),
    "keep-ratio-above-one": lambda t, d, p: (_model("tiny-llava", p, "--keep", "1.5"), ("--keep 1.5",)),
    "keep-not-a-number": lambda t, d, p: (_model("tiny-llava", p, "--keep", "abc"), ("'abc'",)),
    "keep-nan-percent": lambda t, d, p: (_model("tiny-llava", p, "--keep", "nan%"), ("--keep",)),
    "keep-above-visual-tokens": lambda t, d, p: (
        _model("tiny-llava", p, "--keep", "65"), ("--keep 65", "64 prunable visual tokens")),
    "keep-with-method-none": lambda t, d, p: (_model("tiny-llava", p, "--method", "none", "--keep", "16"), ("--keep",)),
    "gprune-without-keep": lambda t, d, p: (_model("tiny-llava", p, "--method", "gprune"), ("--keep",)),
    "theta-out-of-range": lambda t, d, p: (_model("tiny-llava", p, "--keep", "16", "--theta", "2"), ("theta",)),
    "tau-zero": lambda t, d, p: (_model("tiny-llava", p, "--keep", "16", "--tau", "0"), ("tau",)),
    "iters-negative": lambda t, d, p: (_model("tiny-llava", p, "--keep", "16", "--iters", "-1"), ("iters",)),
    "method-unknown": lambda t, d, p: (_model("tiny-llava", p, "--method", "lottery"), ("--method", "'lottery'")),
    "visionzip-on-qwen": lambda t, d, p: (
        _model("tiny-qwen2.5-vl", p, "--method", "visionzip", "--keep", "16"), ("visionzip", "no [CLS] token")),
    "visionzip-on-llava-next": lambda t, d, p: (
        _model("tiny-llava-next", p, "--method", "visionzip", "--keep", "16"), ("visionzip", "LLaVA-NeXT")),
    # prompt and decoding
    "raw-prompt-no-slot-llava": lambda t, d, p: (
        _model("tiny-llava", p, "--raw-prompt", prompt="USER: what color ? ASSISTANT:"), ("'<image>'", "found 0")),
    "raw-prompt-two-slots-llava": lambda t, d, p: (
        _model("tiny-llava", p, "--raw-prompt", prompt="USER: <image> <image>\nwhat ? ASSISTANT:"),
        ("'<image>'", "found 2")),
    "raw-prompt-no-slot-qwen": lambda t, d, p: (
        _model("tiny-qwen2.5-vl", p, "--raw-prompt", prompt=QWEN_PROMPT.replace("<|image_pad|>", "")),
        ("'<|image_pad|>'", "found 0")),
    "raw-prompt-llava-slot-for-qwen": lambda t, d, p: (
        _model("tiny-qwen2.5-vl", p, "--raw-prompt", prompt=LLAVA_PROMPT), ("'<|image_pad|>'", "found 0")),
    "raw-prompt-two-slots-qwen": lambda t, d, p: (
        _model("tiny-qwen2.5-vl", p, "--raw-prompt", prompt=QWEN_PROMPT.replace("<|image_pad|>", "<|image_pad|>" * 2)),
        ("'<|image_pad|>'", "found 2")),
    "max-new-tokens-zero": lambda t, d, p: (_model("tiny-llava", p, "--max-new-tokens", "0"), ("--max-new-tokens: 0",)),
    "max-new-tokens-not-int": lambda t, d, p: (_model("tiny-llava", p, "--max-new-tokens", "x"), ("--max-new-tokens",)),
    # arguments
    "dtype-unknown": lambda t, d, p: (_model("tiny-llava", p, "--dtype", "fp8"), ("--dtype",)),
    "missing-image-arg": lambda t, d, p: (["--model", "tiny-llava", "--prompt", "hi"], ("--image",)),
    "unknown-option": lambda t, d, p: (_model("tiny-llava", p, "--bogus"), ("--bogus",)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_run_user_error(
    case: str, tmp_path: Path, tiny_dirs: dict[str, Path], cache_dir: Path, png: Path, capsys, monkeypatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv, fragments = CASES[case](tmp_path, tiny_dirs, png)
    before = snapshot(tmp_path, cache_dir)
    capsys.readouterr()
    rc = run_main(["run", *argv, "--cache-dir", str(cache_dir)])
    out, err = capsys.readouterr()
    assert_user_error(rc, out, err, fragments)
    assert snapshot(tmp_path, cache_dir) == before, "files were created or changed"


@pytest.mark.parametrize(
    "case",
    ["ckpt-missing", "keep-above-visual-tokens"],  # one before and one after the model is loaded
)
def test_run_user_error_subprocess(
    case: str, tmp_path: Path, tiny_dirs: dict[str, Path], cache_dir: Path, png: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    argv, fragments = CASES[case](tmp_path, tiny_dirs, png)
    before = snapshot(tmp_path, cache_dir)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    proc = subprocess.run(
        [sys.executable, "-m", "vtprune.cli", "run", *argv, "--cache-dir", str(cache_dir)],
        cwd=work, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert_user_error(proc.returncode, proc.stdout, proc.stderr, fragments)
    assert snapshot(tmp_path, cache_dir) == before, "files were created or changed"


@pytest.mark.parametrize("raw", [False, True], ids=["question", "raw-prompt"])
def test_run_json_succeeds(raw: bool, tmp_path: Path, cache_dir: Path, png: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    prompt = ["--raw-prompt", "--prompt", LLAVA_PROMPT] if raw else ["--prompt", "what color ?"]
    capsys.readouterr()
    rc = run_main([
        "run", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--image", str(png), *prompt,
        "--keep", "16", "--max-new-tokens", "4", "--json",
    ])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err
    result = json.loads(out)
    assert result["family"] == "llava"
    assert result["method"] == "gprune"
    assert result["keep"] == 16
    assert result["visual_tokens_kept"] == 16
    assert result["visual_tokens_total"] == 64
    assert result["prefill_tokens"] == result["prompt_tokens"] - 64 + 16
    assert 1 <= len(result["token_ids"]) <= 4
    assert isinstance(result["answer"], str)


PRE_LLM_STAGE_MACS = {"random": 0, "uniform": 0, "divprune": 64 * 64 * 64,  # N^2 * D
                      "visionzip": (1 + 2) * 64 * 64,  # (c + 2) * N * D, keep 8 = 7 dominant + 1 contextual
                      "pool": 64 * 64}  # N * D


@pytest.mark.parametrize("method", ["random", "uniform", "divprune", "visionzip", "pool"])
def test_run_pre_llm_baselines(method: str, cache_dir: Path, png: Path, capsys) -> None:
    capsys.readouterr()
    rc = run_main([
        "run", "--model", "tiny-llava", "--cache-dir", str(cache_dir), "--image", str(png), "--prompt", "what color ?",
        "--method", method, "--keep", "8", "--prune-seed", "3", "--max-new-tokens", "2", "--json",
    ])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    assert (result["method"], result["keep"], result["visual_tokens_kept"]) == (method, 8, 8)
    assert result["prefill_tokens"] == result["prompt_tokens"] - 64 + 8
    assert result["flops"]["prune_stage_macs"] == PRE_LLM_STAGE_MACS[method]
