"""Adding a method or a family is one module: the toy plug-ins in tests/plugins register themselves and
then run through every stage (PyTorch, FLOPs, CLI, export with validation, ONNX Runtime) with no other
file changed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugins.toy_methods import registered_toys
from vtprune import methods
from vtprune.config import PruneConfig
from vtprune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "what shape is in the image ?"

pytest.importorskip("onnxruntime")


def test_the_registry_owns_every_method_table():
    from vtprune.cli import build_parser

    with registered_toys():
        assert PruneConfig("firstk", 4).pre_llm and PruneConfig("normdrop", 4).in_llm
        assert PruneConfig("normdrop", 4).layer == 1  # its registered default
        with pytest.raises(ConfigError, match="needs --layer >= 1"):
            PruneConfig("normdrop", 4, layer=0)
        args = build_parser().parse_args(["run", "--model", "tiny-llava", "--method", "firstk", "--keep", "4",
                                            "--image", "x.png", "--prompt", "q"])
        assert args.method == "firstk"
        spec = importlib.util.spec_from_file_location("sweep_with_toys", ROOT / "benchmarks" / "sweep.py")
        sweep = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sweep)
        assert {"firstk", "normdrop"} <= set(sweep.VARIANTS)
    with pytest.raises(ConfigError, match="unknown pruning method 'firstk'"):
        PruneConfig("firstk", 4)


@pytest.mark.parametrize("method", ["firstk", "normdrop"])
def test_a_registered_method_runs_in_pytorch_and_exports_validated(method, cache_dir, tmp_path, scene):
    from vtprune.api import export_bundle, open_runner
    from vtprune.export.bundle import ExportConfig
    from vtprune.manifest import read_manifest

    with registered_toys():
        cfg = PruneConfig(method, 4)
        with open_runner("tiny-llava", "torch", prune=cfg, cache_dir=cache_dir) as runner:
            ref = runner.generate(scene, QUESTION, 3)
            if cfg.pre_llm:
                prefill = runner.build_prefill(runner.inputs(scene, QUESTION))
                assert prefill.visual_keep[0].tolist() == [0, 1, 2, 3]  # the first k tokens
                assert ref.flops.prune_stage_macs == 7 * 64  # its registered stage cost
        assert ref.visual_tokens_kept == 4
        out = tmp_path / cfg.method
        export_bundle("tiny-llava", cfg, ExportConfig(), out, cache_dir)  # validated against PyTorch
        assert all(r["ok"] for r in read_manifest(out)["validation"]["checks"])
        with open_runner(out) as runner:
            got = runner.generate(scene, QUESTION, 3)
        assert got.visual_tokens_kept == 4
        if cfg.pre_llm:  # exact integer scores: the same kept set, so the same tokens, on any CPU (normdrop's
            assert got.token_ids == ref.token_ids  # float norms are judged tie-aware by the export's validation)


def test_a_registered_family_loads_runs_and_exports(tiny_dirs, tmp_path):
    """In a fresh process (the suite's family list stays as it is): import the toy family module, load a
    checkpoint of its model_type, answer in PyTorch, export a validated bundle and answer from it."""
    code = f"""
import sys
from pathlib import Path
from tests.plugins import toy_family
from vtprune.api import export_bundle, open_runner
from vtprune.config import PruneConfig
from vtprune.export.bundle import ExportConfig
from vtprune.images import scene_image

ckpt = toy_family.write_checkpoint(Path({str(tiny_dirs["tiny-llava"])!r}), Path({str(tmp_path / "ckpt")!r}))
cfg = PruneConfig("random", 8)  # integer scores: the same kept set on any CPU
with open_runner(str(ckpt), "torch", prune=cfg) as runner:
    assert runner.adapter.family == "toy_llava"
    assert "please answer" in runner.adapter.format_prompt("q")
    ref = runner.generate(scene_image(), "what shape ?", 3)
out = Path({str(tmp_path / "bundle")!r})
export_bundle(str(ckpt), cfg, ExportConfig(), out)
with open_runner(out) as runner:
    got = runner.generate(scene_image(), "what shape ?", 3)
assert got.token_ids == ref.token_ids, (got.token_ids, ref.token_ids)
print("family", runner.adapter.family, got.token_ids)
"""
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "family toy_llava" in proc.stdout


def test_a_method_without_its_implementation_is_refused_at_registration():
    with pytest.raises(ValueError, match="needs a router"):
        methods.Method("broken", "in_llm", "no router")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.get("gprune"))
