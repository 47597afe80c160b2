"""VisionZip exported into the tiny LLaVA vision graph: standard ops plus ``vtprune::TopKRoute`` (no
Loop), validated against PyTorch on export, identical kept indices and matching embeddings in ONNX
Runtime on another image, dominant tokens from the tower's own attention, fp16 refused, and a
TensorRT-RTX build of the vision graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vtprune.api import export_bundle
from vtprune.config import PruneConfig
from vtprune.export.bundle import ExportConfig
from vtprune.manifest import read_manifest

PROMPT = "what color is the shape ?"
KEEP = 16  # of 64: 14 dominant + 2 contextual


@pytest.fixture(scope="module")
def zip_bundle(bundles, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("visionzip") / "tiny-llava-visionzip"
    export = ExportConfig(reuse_lm_from=str(bundles["tiny-llava"]))
    export_bundle("tiny-llava", PruneConfig(method="visionzip", keep=KEEP), export, out, cache_dir)
    return out


def _other_image():
    from PIL import ImageOps

    from vtprune.images import scene_image

    return ImageOps.mirror(scene_image()).rotate(20)  # not the export sample


def test_visionzip_export_is_validated_and_standard_ops_plus_topk_route(zip_bundle):
    import onnx

    m = read_manifest(zip_bundle)
    assert m["prune"]["method"] == "visionzip" and all(r["ok"] for r in m["validation"]["checks"])
    assert m["graphs"]["vision"]["meta"]["visionzip"] | {"kept_indices": ""} == {
        "dominant": 14, "contextual": 2, "feature_layer": "vision_feature_layer", "kept_indices": ""}  # fmt: skip
    model = onnx.load(str(zip_bundle / "vision.onnx"))
    assert {(n.domain, n.op_type) for n in model.graph.node if n.domain == "vtprune"} == {("vtprune", "TopKRoute")}
    assert not any(n.op_type in ("Loop", "Scan", "If", "NonZero") for n in model.graph.node)
    outputs = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert outputs["image_embeds"][1:] == [KEEP, 64] and outputs["kept_indices"][1:] == [KEEP]


def test_visionzip_bundle_matches_pytorch_on_another_image(zip_bundle, tiny_dirs):
    from vtprune.check.validate import compare_backends
    from vtprune.models import load_vlm

    adapter = load_vlm(tiny_dirs["tiny-llava"])
    rows = {r["check"]: r for r in compare_backends(adapter, PruneConfig("visionzip", KEEP), zip_bundle,
                                                     _other_image(), PROMPT, 4)}  # fmt: skip
    assert all(r["ok"] for r in rows.values()), rows
    assert rows["decoder input embeds"]["max_abs_diff"] <= 1e-4


def test_visionzip_graph_keeps_the_towers_dominant_tokens(zip_bundle, tiny_dirs):
    from vtprune.backends.ort import OrtVlm
    from vtprune.models import load_vlm

    vlm = OrtVlm(zip_bundle)
    inputs = vlm.inputs(_other_image(), PROMPT)
    embeds, kept, _ = vlm.sessions["vision"].run(None, vlm.vision_feeds(inputs))[:3]  # (1, K, D), (1, K)
    adapter = load_vlm(tiny_dirs["tiny-llava"])
    tower = adapter.model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            attn = tower(inputs["pixel_values"], output_attentions=True).attentions[-2]  # feature layer -2
            unpruned = adapter.encode_image(inputs).embeds[0].numpy()  # (64, D)
    finally:
        tower.set_attn_implementation("sdpa")
    dominant = attn[0, :, 0, 1:].sum(dim=0).topk(14).indices.tolist()
    assert set(dominant) <= set(kept[0].tolist()) and (np.diff(kept[0]) > 0).all()
    rows = {int(i): r for r, i in enumerate(kept[0])}
    for i in dominant:
        assert np.allclose(embeds[0, rows[i]], unpruned[i], atol=1e-4), i
    contextual = [i for i in kept[0].tolist() if i not in dominant]
    assert len(contextual) == 2 and not np.allclose(embeds[0, rows[contextual[0]]], unpruned[contextual[0]])


def test_visionzip_fp16_export_validates_with_its_own_tie_margin(cache_dir, tmp_path):
    """The tie margin re-scores the encoder evidence VisionZip ranks by, so fp16 bundles validate too."""
    out = tmp_path / "fp16"
    manifest = export_bundle("tiny-llava", PruneConfig("visionzip", KEEP), ExportConfig(dtype="fp16"), out, cache_dir)
    rows = {r["check"]: r for r in manifest["validation"]["checks"]}
    assert all(r["ok"] for r in rows.values())
    assert rows["kept visual indices"]["max_margin"] <= rows["kept visual indices"]["margin_limit"] == 1e-2


def test_visionzip_vision_graph_builds_with_tensorrt_rtx(zip_bundle):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX (pip install 'vtprune[trt]') is not installed")
    from vtprune.backends.trt.build import build_engine
    from vtprune.backends.trt.profiles import ProfileLimits, profiles_from_onnx

    path = zip_bundle / "vision.onnx"
    result = build_engine(path, profiles_from_onnx(path, ProfileLimits(batch=(1, 1, 2))), target="sm89")
    assert result.engine_size > 0
