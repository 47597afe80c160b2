"""vtprune as an lmms-eval model: the request handling (``Bridge``) on a tiny model without lmms-eval, and,
where lmms-eval is installed, a local easy-vqa task run end to end offline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vtprune.config import PruneConfig
from vtprune.errors import ConfigError, InputError
from vtprune.eval.lmms_model import Bridge

HAS_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lmms_eval" / "easy_vqa"


@pytest.fixture(scope="module")
def bridge(tiny_dirs):
    b = Bridge(pretrained=str(tiny_dirs["tiny-llava"]), method="gprune", keep="4", batch_size=1, device="cuda")
    yield b
    b.close()


def _task(scene):
    return {"t": {"test": [{"image": scene}, {"image": None}]}}, lambda doc: [doc["image"]] if doc["image"] else []


def test_generate_until_matches_vtprune_generate(bridge, scene) -> None:
    from vtprune.runtime.generate import generate

    task_dict, to_visual = _task(scene)
    assert bridge.runner.cfg == PruneConfig(method="gprune", keep=4)
    plain = generate(bridge.runner, scene, "what is this?", 5).answer
    got = bridge.generate([("what is this?", {"max_new_tokens": 5, "until": []}, to_visual, 0, "t", "test")],
                          task_dict)  # fmt: skip
    assert got == [plain]
    if plain.strip():
        stop = plain.strip()[-1]
        cut = bridge.generate([("what is this?", {"max_new_tokens": 5, "until": [stop]}, to_visual, 0, "t", "test")],
                              task_dict)  # fmt: skip
        assert cut == [plain.split(stop, 1)[0]]
    with pytest.raises(InputError, match="doc 1: .*has none"):
        bridge.generate([("what?", {}, to_visual, 1, "t", "test")], task_dict)


def test_loglikelihood_scores_continuations_from_one_prefill(bridge, scene) -> None:
    from vtprune.runtime.generate import generate

    task_dict, to_visual = _task(scene)
    greedy = generate(bridge.runner, scene, "what is this?", 2, eos=set())
    greedy_text = bridge.runner.adapter.decode(greedy.token_ids)
    conts = [" " + greedy_text, " yes", " no"]
    reqs = [("what is this?", c, to_visual, 0, "t", "test") for c in conts]
    out = bridge.loglikelihood(reqs, task_dict)
    ids = [bridge.runner.adapter.tokenizer.encode(c.lstrip(), add_special_tokens=False) for c in conts]
    ref = generate(bridge.runner, scene, "what is this?", 2, candidates=ids).candidate_logprobs
    assert [loss for loss, _ in out] == pytest.approx([-lp for lp in ref])
    if ids[0] == greedy.token_ids[: len(ids[0])]:  # the decoded text re-encodes to the same tokens
        assert out[0][1] is True
    target = bridge.loglikelihood([("what is this?", lambda doc: " yes", to_visual, 0, "t", "test")], task_dict)
    assert target[0][0] == pytest.approx(out[1][0])


def test_bridge_refusals(tiny_dirs, bundles) -> None:
    with pytest.raises(ConfigError, match="unknown colour"):
        Bridge(pretrained=str(tiny_dirs["tiny-llava"]), colour="red")
    with pytest.raises(ConfigError, match="pruning is fixed at export"):
        Bridge(pretrained=str(bundles["tiny-llava"]), method="gprune", keep="4")
    with pytest.raises(ConfigError, match="runs a bundle"):
        Bridge(pretrained=str(tiny_dirs["tiny-llava"]), backend="ort")


@pytest.mark.skipif(not HAS_LMMS_EVAL, reason="lmms-eval not installed: its dependencies replace the CPU torch "
                    "with a CUDA build; docs/evaluation.md installs it beside vtprune")  # fmt: skip
def test_lmms_eval_runs_vtprune_on_a_local_task(tmp_path: Path, pocket_cache: Path) -> None:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--limit", "4", "--out",
                    str(EXAMPLE / "data" / "easy_vqa.jsonl")], check=True, env=env)  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "vtprune", "--model_args",
         f"pretrained=pocket,cache_dir={pocket_cache},method=gprune,keep=64", "--include_path", str(EXAMPLE),
         "--tasks", "vtprune_easy_vqa", "--batch_size", "1", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("*results.json")).read_text())["results"]
    assert 0.0 <= results["vtprune_easy_vqa_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["vtprune_easy_vqa_mc"]["acc,none"] <= 1.0
