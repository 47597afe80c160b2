"""benchmarks/accuracy_curve.py's merging and resume logic, and the GPU lease driver's argument check."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def curve():
    path = REPO / "benchmarks" / "accuracy_curve.py"
    spec = importlib.util.spec_from_file_location("accuracy_curve", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_shard_means_are_weighted_by_questions(curve):
    parts = [{"n": 1, "tokens": {"kept": 10.0, "layers": [1.0, 2.0]}},
             {"n": 3, "tokens": {"kept": 30.0, "layers": [3.0, 6.0]}}]  # fmt: skip
    assert curve._weighted(parts, "tokens") == {"kept": 25.0, "layers": [2.5, 5.0]}


def test_a_rerun_keeps_finished_cells_only_for_the_same_settings(curve, tmp_path):
    settings = {"split": "test", "limit": 10, "seed": 0, "device": "cpu", "workers": 2, "budgets": [64]}
    cell = {"prune": {"method": "none", "keep": None}, "accuracy": 0.5}
    (tmp_path / "curve.json").write_text(json.dumps({"settings": settings, "cells": [cell]}))
    same = curve._finished_cells(tmp_path / "curve.json", settings | {"workers": 6})  # workers do not matter
    assert list(same.values()) == [cell]
    assert curve._finished_cells(tmp_path / "curve.json", settings | {"limit": 20}) == {}
    assert curve._finished_cells(tmp_path / "missing.json", settings) == {}


def test_gpu_session_refuses_an_unknown_phase(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "GPU_SESSION_ROOT": str(tmp_path / "root")}
    script = REPO / "scripts" / "gpu_session.sh"
    proc = subprocess.run(["bash", str(script), "bogus"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    assert not (tmp_path / "root").exists()  # nothing written before the phase is known
