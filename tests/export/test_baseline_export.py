"""Pre-LLM baselines (random, uniform, DivPrune) exported for every tiny family: standard ops plus
``vtprune::TopKRoute`` (no Loop), kept indices identical to PyTorch on the export image and on an image
of another shape (LLaVA-NeXT: padded slots in play), and TensorRT-RTX builds of the vision graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FAMILIES
from vtprune import methods
from vtprune.api import export_bundle
from vtprune.config import PruneConfig
from vtprune.export.bundle import ExportConfig
from vtprune.manifest import read_manifest
from vtprune.prune import selector

# G-Prune: tests/export/test_bundle.py; VisionZip (tiny-llava only, refused elsewhere): test_visionzip_export.py
BASELINES = [m for m in methods.names("pre") if m != "gprune"]
# LLaVA-NeXT: 11 base + 44 high-res of 64 slots: a choice among the export image's 48 high-res tokens
# (padding and newlines interleaved in the graph), and padding filling in after the other image's 40
KEEP = {"tiny-llava": 16, "tiny-llava-next": 55, "tiny-qwen2.5-vl": 16}
PROMPT = "what color is the shape ?"
LATTICE_8X8_K16 = [r * 8 + c for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)]  # uniform on 64 = 8x8 tokens


# pool reads the token grid, which varies per image in LLaVA-NeXT's high-res view: refused there
# (tests/prune/test_pool.py), exported for the others
CASES = [(f, m) for f in sorted(FAMILIES) for m in BASELINES if not (f == "tiny-llava-next" and selector(m).grid)]


@pytest.fixture(scope="module", params=CASES, ids="-".join)
def baseline_bundle(request, bundles, cache_dir, tmp_path_factory) -> Path:
    """A validated bundle per (family, method); embed/decoder graphs reused from the G-Prune bundle."""
    family, method = request.param
    out = tmp_path_factory.mktemp("baselines") / f"{family}-{method}"
    cfg, export = PruneConfig(method=method, keep=KEEP[family]), ExportConfig(reuse_lm_from=str(bundles[family]))
    export_bundle(family, cfg, export, out, cache_dir)
    return out


def test_export_is_validated_and_the_vision_graph_is_standard_ops_plus_topk_route(baseline_bundle):
    import onnx

    m = read_manifest(baseline_bundle)
    assert m["prune"]["method"] in BASELINES and all(r["ok"] for r in m["validation"]["checks"])
    model = onnx.load(str(baseline_bundle / "vision.onnx"))
    assert {(n.domain, n.op_type) for n in model.graph.node if n.domain == "vtprune"} == {("vtprune", "TopKRoute")}
    assert {f.name for f in model.functions} == {"TopKRoute"}
    assert not any(n.op_type in ("Loop", "Scan", "If") for n in model.graph.node)


def _other_image():
    from vtprune.images import scene_image

    return scene_image().resize((280, 120))  # not the export sample; LLaVA-NeXT picks a smaller grid


def test_kept_indices_match_pytorch_on_another_image(baseline_bundle, tiny_dirs):
    from vtprune.check.validate import compare_backends
    from vtprune.models import load_vlm

    cfg = PruneConfig.from_dict(read_manifest(baseline_bundle)["prune"])
    adapter = load_vlm(tiny_dirs[baseline_bundle.name.rsplit("-", 1)[0]])
    rows = {r["check"]: r for r in compare_backends(adapter, cfg, baseline_bundle, _other_image(), PROMPT, 2)}
    assert rows["kept visual indices"]["ok"] and rows["position ids"]["ok"], rows
    assert rows["prefill logits"]["ok"] and rows["greedy tokens (2 steps)"]["ok"], rows


def _vision_outputs(bundle: Path) -> list[np.ndarray]:
    from vtprune.backends.ort import OrtVlm

    vlm = OrtVlm(bundle)
    inputs = vlm.inputs(vlm._fit_image(_other_image()), PROMPT)
    return vlm.sessions["vision"].run(None, vlm.vision_feeds(inputs))


def test_vision_graph_outputs_follow_the_method(baseline_bundle):
    _, kept, kept_valid = _vision_outputs(baseline_bundle)[:3]  # (1, K, D), (1, K), (1, K)
    family, method = baseline_bundle.name.rsplit("-", 1)
    assert kept.shape == (1, KEEP[family] + (8 if family == "tiny-llava-next" else 0))  # + newline slots
    valid_kept = kept[kept_valid]
    assert (np.diff(valid_kept) > 0).all()  # ascending, unique
    if family == "tiny-llava-next":
        assert not kept_valid.all(), "the high-res budget should exceed this image's grid (padding in play)"
    elif method == "uniform" and family == "tiny-llava":
        assert kept[0].tolist() == LATTICE_8X8_K16
    elif method == "uniform":  # Qwen2.5-VL at native resolution: the lattice of this image's own grid
        import torch

        from vtprune.backends.ort import OrtVlm
        from vtprune.prune.baselines import uniform_scores

        t, h, w = OrtVlm(baseline_bundle).inputs(_other_image(), PROMPT)["image_grid_thw"][0].tolist()
        n = t * h * w // 4
        expected = uniform_scores(torch.ones(1, n, dtype=torch.bool), KEEP[family])[0].nonzero().ravel()
        assert kept[0].tolist() == expected.tolist() and n != 64


def test_vision_graph_builds_with_tensorrt_rtx(baseline_bundle):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX (pip install 'vtprune[trt]') is not installed")
    from vtprune.backends.trt.build import build_engine
    from vtprune.backends.trt.profiles import ProfileLimits, profiles_from_onnx

    path = baseline_bundle / "vision.onnx"
    result = build_engine(path, profiles_from_onnx(path, ProfileLimits(batch=(1, 1, 2))), target="sm89")
    assert result.engine_size > 0
