"""Adapters: registry completeness, loading through the checkpoint path, visual layouts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import FAMILIES
from vtprune.config import PruneConfig
from vtprune.errors import PickleWeightsError, UnsupportedModelError
from vtprune.models import adapter_for, adapters, load_vlm
from vtprune.models.checkpoint import check_weights, read_config
from vtprune.runtime.pipeline import PrunedVlm


def test_every_registered_family_has_a_tiny_model_and_tests():
    assert set(adapters()) == set(FAMILIES.values())


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedModelError, match="llava, llava_next, qwen2_5_vl"):
        adapter_for("bert")


def test_tiny_adapter_family_matches_config(tiny_adapter):
    assert tiny_adapter.family == read_config(tiny_adapter.path)["model_type"]
    assert FAMILIES[tiny_adapter.path.name] == tiny_adapter.family


def test_visual_tokens_fill_the_image_slots(tiny_adapter, scene):
    inputs = PrunedVlm(tiny_adapter, PruneConfig()).inputs(scene, "what is in the image ?")
    visual = tiny_adapter.encode_image(inputs)
    slots = int((inputs["input_ids"] == tiny_adapter.image_token_id).sum())
    assert visual.embeds.shape[:2] == (1, slots) == (1, visual.layout.num_tokens)
    groups = torch.cat([*visual.layout.groups, visual.layout.always_keep]).sort().values
    assert groups.tolist() == list(range(slots))  # groups and always-kept partition the tokens


def test_llava_next_layout_base_hr_and_newlines(tiny_dirs, scene):
    adapter = load_vlm(tiny_dirs["tiny-llava-next"])
    inputs = adapter.prepare(scene, adapter.format_prompt("what ?"))
    visual = adapter.encode_image(inputs)
    layout = visual.layout
    base, hr = layout.groups
    assert base.tolist() == list(range(16))  # 56 px / 14 px patches = 4x4 base view
    newline = adapter.model.model.image_newline
    for i in layout.always_keep.tolist():
        torch.testing.assert_close(visual.embeds[0, i], newline)
    # one newline closes each high-res row, so rows are evenly spaced and end the sequence
    gaps = layout.always_keep.diff().unique()
    assert gaps.numel() == 1 and int(layout.always_keep[-1]) == layout.num_tokens - 1
    assert hr.numel() == layout.always_keep.numel() * (int(gaps) - 1)


def test_qwen_image_tokens_and_mrope_ids(tiny_dirs, scene):
    adapter = load_vlm(tiny_dirs["tiny-qwen2.5-vl"])
    inputs = adapter.prepare(scene, adapter.format_prompt("what ?"))
    t, h, w = inputs["image_grid_thw"][0].tolist()
    n = t * h * w // 4
    assert int((inputs["input_ids"] == adapter.image_token_id).sum()) == n
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == adapter.image_token_id)
    pos = adapter.position_ids(inputs)
    image = inputs["mm_token_type_ids"][0].bool()
    assert pos.shape == (3, 1, inputs["input_ids"].shape[1])
    assert pos[1, 0, image].unique().numel() == h // 2 and pos[2, 0, image].unique().numel() == w // 2


def test_loading_by_name_and_by_directory_agree(tiny_dirs, cache_dir):
    a = load_vlm("tiny-llava", cache_dir=cache_dir)
    b = load_vlm(tiny_dirs["tiny-llava"])
    assert a.path == b.path
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_tiny_models_are_deterministic(tmp_path, tiny_dirs):
    from vtprune.models.tiny import materialize

    again = materialize("tiny-llava", tmp_path)
    old = (tiny_dirs["tiny-llava"] / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == old


def test_pickle_weights_refused_unless_allowed(tmp_path, tiny_dirs):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(tiny_dirs["tiny-llava"] / "config.json", ckpt)
    (ckpt / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(PickleWeightsError, match="--allow-pickle"):
        check_weights(ckpt, allow_pickle=False)
    assert check_weights(ckpt, allow_pickle=True) == "pickle"


def test_fp16_load(tiny_dirs, scene):
    adapter = load_vlm(tiny_dirs["tiny-llava"], dtype="fp16")
    assert adapter.model.dtype == torch.float16
    r = PrunedVlm(adapter, PruneConfig(method="gprune", keep=8)).generate(scene, "what ?", max_new_tokens=2)
    assert r.visual_tokens_kept == 8


def test_config_json_is_read_not_executed(tmp_path):
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llava", "auto_map": {"AutoModel": "x.Y"}}))
    assert read_config(ckpt)["model_type"] == "llava"


def test_config_without_subconfigs_is_refused_before_building_a_default_model(tmp_path, tiny_dirs):
    from vtprune.errors import CheckpointError

    ckpt = tmp_path / "c"
    shutil.copytree(tiny_dirs["tiny-llava"], ckpt)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CheckpointError, match="lacks text_config, vision_config"):
        load_vlm(ckpt)


@pytest.mark.parametrize("size", [(240, 320), (100, 150), (150, 100), (56, 56), (300, 60), (60, 300)])
def test_llava_next_packed_codes_match_the_models_own_packing(tiny_dirs, size):
    from vtprune.models.llava_next import packed_codes

    adapter = load_vlm(tiny_dirs["tiny-llava-next"])
    cfg = adapter.config
    image_size = torch.tensor(size)
    mine = packed_codes(cfg, image_size)
    per_crop = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    crops = int(mine.max()) // per_crop + 1
    coded = torch.arange(crops * per_crop, dtype=torch.float32).view(crops, per_crop, 1)
    packed, _ = adapter.model.model.pack_image_features(
        [coded], image_size[None], cfg.vision_feature_select_strategy, image_newline=torch.tensor([-1.0])
    )
    assert torch.equal(packed[0][:, 0].long(), mine)


def test_qwen_mrope_ids_match_the_models_get_rope_index(tiny_dirs, scene):
    adapter = load_vlm(tiny_dirs["tiny-qwen2.5-vl"])
    for image in (scene, scene.resize((60, 200)), scene.resize((300, 56))):
        inputs = adapter.prepare(image, adapter.format_prompt("what ?"))
        ref, _ = adapter.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
        )  # fmt: skip
        assert torch.equal(adapter.position_ids(inputs), ref)
