"""Real-size checkpoints without the hub (``vtprune make-checkpoint``): the published architectures'
parameter counts, and shrunk copies written shard by shard and loaded through ``load_vlm`` with every
tensor as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vtprune.cli import main
from vtprune.models import load_vlm
from vtprune.models.published import PUBLISHED, draw, parameter_count, write_checkpoint


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    """Built on the meta device from our config values: the model cards' parameter counts."""
    assert parameter_count(name) / 1e9 == pytest.approx(PUBLISHED[name].params, abs=0.005)


def shrink(config):
    """2 text layers of width 64, a 2-block vision tower: the same classes and key names, tiny."""
    text = config.get_text_config()
    kv = 2 if text.num_key_value_heads != text.num_attention_heads else 4
    text.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                 "num_key_value_heads": kv})  # fmt: skip
    vision = config.vision_config
    if config.model_type == "qwen2_5_vl":
        text.update({"layer_types": text.layer_types[:2], "max_window_layers": 2})
        text.rope_parameters["mrope_section"] = [2, 3, 3]
        vision.update({"depth": 2, "fullatt_block_indexes": [1], "hidden_size": 64, "intermediate_size": 96,
                       "num_heads": 2, "out_hidden_size": 64})  # fmt: skip
    else:
        vision.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 2})
    return config


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-3b"])
def test_written_shards_load_through_load_vlm(name, tmp_path):
    out = tmp_path / name
    record = write_checkpoint(name, out, dtype="fp16", overrides=shrink, shard_bytes=1 << 20, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == record["shards"] > 1 and all((out / f).is_file() for f in files)
    assert record["published"] is False and record["bytes"] == index["metadata"]["total_size"]
    adapter = load_vlm(str(out), dtype="fp16")
    params = dict(adapter.model.named_parameters())  # tied weights once, as written
    assert set(params) == set(index["weight_map"])
    for key, value in params.items():  # every tensor as written: no key was renamed or re-initialised
        assert torch.equal(value.data, draw(key, tuple(value.shape), torch.float16, 0)), key
    assert adapter.tokenizer.convert_tokens_to_ids(adapter.image_slot) == adapter.model.config.image_token_id


def test_draw_is_seeded_per_tensor():
    a = draw("x.weight", (3, 4), torch.bfloat16, 0)
    assert torch.equal(a, draw("x.weight", (3, 4), torch.bfloat16, 0))
    assert not torch.equal(a, draw("y.weight", (3, 4), torch.bfloat16, 0))
    assert not torch.equal(a, draw("x.weight", (3, 4), torch.bfloat16, 1))
    assert 0.005 < float(a.float().std()) < 0.05
    assert torch.equal(draw("n.weight", (5,), torch.float16, 0), torch.ones(5, dtype=torch.float16))
    assert torch.equal(draw("n.bias", (5,), torch.float16, 0), torch.zeros(5, dtype=torch.float16))


def test_cli_refuses_unknown_config_and_foreign_directory(tmp_path, capsys):
    assert main(["make-checkpoint", "--config", "llava-13b", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "llava-1.5-7b" in err and "Traceback" not in err and not (tmp_path / "x").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["make-checkpoint", "--config", "qwen2.5-vl-3b", "--out", str(mine), "--force"]) == 2
    assert (mine / "notes.txt").read_text() == "keep me"


def test_disk_space_is_checked_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from vtprune.errors import CheckpointError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 1 << 40, 1 << 30))
    with pytest.raises(CheckpointError, match=r"needs 7\.\d GB of disk"):
        write_checkpoint("qwen2.5-vl-3b", tmp_path / "q", progress=False)
    assert not Path(tmp_path / "q").exists()
