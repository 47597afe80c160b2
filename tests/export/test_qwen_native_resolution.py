"""Qwen2.5-VL at native resolution: one vision graph for any image size (the patch count is a graph
dimension, the grid-derived tensors are inputs computed on the host) with a fixed visual-token budget,
validated against PyTorch on several sizes and aspect ratios; kept tokens keep their M-RoPE ids."""

from __future__ import annotations

import numpy as np
import pytest

from vtprune.config import PruneConfig
from vtprune.manifest import read_manifest

SIZES = [(448, 448), (640, 200), (200, 640), (60, 60), (1000, 700)]


@pytest.fixture(scope="module")
def qwen(bundles):
    from vtprune.models import load_vlm

    bundle = bundles["tiny-qwen2.5-vl"]
    return bundle, load_vlm(str(read_manifest(bundle)["model"]["source"])), read_manifest(bundle)


def test_the_vision_graph_takes_any_grid(qwen):
    _, _, manifest = qwen
    vision = manifest["graphs"]["vision"]
    meta, dims = vision["meta"], {i["name"]: i["shape"] for i in vision["inputs"]}
    assert meta["dynamic_grid"] and "grid_thw" not in meta
    assert dims["pixel_values"][0] == "4*merged_tokens" and dims["window_index"] == ["merged_tokens"]
    assert meta["min_tokens"] >= meta["budget"] == manifest["prune"]["keep"]  # small images are upscaled to K


@pytest.mark.parametrize("size", SIZES)
def test_parity_with_pytorch_at_each_size(qwen, scene, size):
    from vtprune.backends.ort import OrtVlm
    from vtprune.check.validate import compare_backends
    from vtprune.runtime.timing import StageTimer

    bundle, adapter, manifest = qwen
    image = scene.resize(size)
    cfg = PruneConfig.from_dict(manifest["prune"])
    rows = compare_backends(adapter, cfg, bundle, image, "what color is the shape ?", 4)
    assert all(r["ok"] for r in rows), rows
    runner = OrtVlm(bundle)
    inputs = runner.inputs(image, "what color is the shape ?")
    pre = runner.prefill_inputs(inputs, StageTimer())
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert pre["visual_total"] == t * h * w // 4 >= pre["visual_kept"] == manifest["prune"]["keep"]
    # the kept tokens' M-RoPE ids are the unpruned prompt's ids at their positions (gaps, not renumbered)
    full = runner.adapter.position_ids(inputs).numpy()
    np.testing.assert_array_equal(pre["positions"], full[..., pre["seq_keep"]])
    ids = inputs["input_ids"].numpy()[0]
    image_rows = np.flatnonzero(ids == runner.adapter.image_token_id)
    kept_rows = image_rows[pre["keep_idx"]]
    start = full[0, 0, image_rows[0]]
    rel = full[:, 0, kept_rows] - start  # (3, K) (t, h, w) offsets from the image's start
    np.testing.assert_array_equal(rel[1], pre["keep_idx"] // (w // 2))
    np.testing.assert_array_equal(rel[2], pre["keep_idx"] % (w // 2))


def test_grids_differ_between_sizes(qwen, scene):
    from vtprune.backends.ort import OrtVlm

    runner = OrtVlm(qwen[0])
    grids = {tuple(runner.inputs(scene.resize(s), "x")["image_grid_thw"][0].tolist()) for s in SIZES}
    assert len(grids) >= 4
