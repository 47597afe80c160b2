"""The PyTorch pipeline runs where the weights are: every tensor it (or a pruning method) creates follows
the model's device. Checked on the CPU by making ``meta`` the process-wide default device: any tensor
created outside the pipeline's device scope becomes a meta tensor and the first op mixing it with real
tensors fails, so a CUDA run would have failed the same way (a CPU tensor next to CUDA weights)."""

from __future__ import annotations

import pytest
import torch

from vtprune.config import PruneConfig
from vtprune.runtime.pipeline import PrunedVlm

QUESTION = "what color is the shape ?"
CONFIGS = {
    "none": PruneConfig(),
    "gprune": PruneConfig(method="gprune", keep=6),
    "random": PruneConfig(method="random", keep=6),
    "uniform": PruneConfig(method="uniform", keep=6),
    "divprune": PruneConfig(method="divprune", keep=6),
    "fastv": PruneConfig(method="fastv", keep=6, layer=1),
    "dart": PruneConfig(method="dart", keep=6, layer=1),
    "alvts": PruneConfig(method="alvts", keep=6, layer=1),
    "alvts-kv-instruction": PruneConfig(method="alvts", keep=6, layer=1, skip="kv", query="instruction"),
    "alvts-exact": PruneConfig(method="alvts", keep=6, layer=1, selector="exact"),
    "visionzip": PruneConfig(method="visionzip", keep=6),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pipeline_creates_no_tensor_off_the_model_device(tiny_adapter, scene, name):
    cfg = CONFIGS[name]
    try:
        tiny_adapter.check_prune(cfg)
    except Exception as exc:  # a method this family refuses (e.g. VisionZip on Qwen2.5-VL)
        pytest.skip(f"{tiny_adapter.family} refuses {name}: {exc}")
    ref = PrunedVlm(tiny_adapter, cfg).generate(scene, QUESTION, max_new_tokens=4)
    torch.set_default_device("meta")
    try:
        gen = PrunedVlm(tiny_adapter, cfg).generate(scene, QUESTION, max_new_tokens=4)
    finally:
        torch.set_default_device(None)
    assert gen.token_ids == ref.token_ids
    assert gen.visual_tokens_kept == ref.visual_tokens_kept


def test_pipeline_follows_the_weights_device(tiny_adapter):
    assert PrunedVlm(tiny_adapter, PruneConfig()).device == next(tiny_adapter.model.parameters()).device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    ("command", "fragment"),
    [
        (["run", "--model", "tiny-llava", "--device", "cuda"], "sees no CUDA GPU"),
        (["run", "--model", "tiny-llava", "--device", "tpu"], "is not a device"),
        (["run", "--model", "tiny-llava", "--device", "mps"], "runs on cpu or cuda"),
        (["eval", "--model", "tiny-llava", "--device", "cuda", "--limit", "1"], "sees no CUDA GPU"),
        (["bench", "--backend", "torch", "--model", "tiny-llava", "--budgets", "all", "--device", "cuda"],
         "sees no CUDA GPU"),
        (["bench", "--model", "tiny-llava", "--budgets", "all", "--device", "cuda"], "applies to --backend torch"),
    ],
    ids=["run-cuda", "run-bad-name", "run-mps", "eval-cuda", "bench-cuda", "bench-ort-device"],
)
def test_an_unusable_device_is_one_line_and_exit_2(command, fragment, cache_dir, png, tmp_path, capsys):
    from tests.test_cli import assert_user_error, run_main

    extra = ["--cache-dir", str(cache_dir)]
    if command[0] == "run":
        extra += ["--image", str(png), "--prompt", "what ?"]
    if command[0] == "bench":
        extra += ["--out", str(tmp_path / "report")]
    capsys.readouterr()
    rc = run_main(command + extra)
    assert_user_error(rc, *capsys.readouterr(), (fragment,))
    assert not (tmp_path / "report").exists()
