"""SmoothQuant for w8a8 bundles (``export.smooth``): calibrated on the decoder's prefill inputs, folded into
a copy of the model without changing its function, outliers flattened, the worst down projections kept
block-wise, ALVTS selectors' inputs left as they are."""

from __future__ import annotations

import onnx
import pytest
import torch

from vtprune.api import export_bundle
from vtprune.config import PruneConfig
from vtprune.errors import InputError, InternalError
from vtprune.export.bundle import ExportConfig
from vtprune.export.quantize import down_projections, quantize_graph
from vtprune.export.smooth import activation_ranges, prefill_feeds, smoothed_copy
from vtprune.images import calibration_images
from vtprune.manifest import read_manifest
from vtprune.models import load_vlm

GPRUNE = PruneConfig(method="gprune", keep=16)


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory, scene):
    root = tmp_path_factory.mktemp("calib")
    for i, size in enumerate([(320, 240), (200, 300), (256, 256)]):
        scene.resize(size).rotate(40 * i).save(root / f"img{i}.png")
    return root


def _planted(tiny_dirs, layer: int = 1, channel: int = 5, factor: float = 1000.0):
    """tiny-llava with one outlier channel at a down projection's input (the up projection's row times
    ``factor``, the down projection's column divided by it): the same function, one huge activation."""
    adapter = load_vlm(str(tiny_dirs["tiny-llava"]))
    mlp = adapter.decoder.layers[layer].mlp
    with torch.no_grad():
        mlp.up_proj.weight[channel] *= factor
        mlp.down_proj.weight[:, channel] /= factor
    return adapter


def test_smoothing_keeps_the_function_flattens_the_outlier_and_leaves_the_reference(tiny_dirs, calib_dir):
    adapter = _planted(tiny_dirs)
    feeds = list(prefill_feeds(adapter, GPRUNE, calibration_images(str(calib_dir), 3)))
    assert len(feeds) == 3 and feeds[0]["inputs_embeds"].ndim == 3
    ranges = activation_ranges(adapter.decoder, feeds)
    down = ranges["layers.1.mlp.down_proj"]
    assert down.argmax() == 5 and down.max() / down.median() > 300
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}

    twin, record = smoothed_copy(adapter, feeds)
    assert record["blockwise"] == ["layers.1.mlp.down_proj"] and record["groups"] == 3 * 2
    assert record["outlier_ratio_after"] < record["outlier_ratio_before"] / 50
    after = adapter.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the validation reference is untouched
    assert not torch.equal(twin.decoder.layers[1].mlp.down_proj.weight, adapter.decoder.layers[1].mlp.down_proj.weight)

    embeds, positions = (torch.from_numpy(feeds[0][k]) for k in ("inputs_embeds", "position_ids"))
    with torch.inference_mode():
        want = adapter.decoder(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        got = twin.decoder(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("selector", ["lowrank", "paper"])
def test_alvts_selectors_of_a_smoothed_copy_score_as_their_source(tiny_dirs, calib_dir, selector):
    from vtprune.runtime.layerwise import selectors_for

    adapter = load_vlm(str(tiny_dirs["tiny-llava"]))
    twin, _ = smoothed_copy(adapter, prefill_feeds(adapter, GPRUNE, calibration_images(str(calib_dir), 2)))
    cfg = PruneConfig(method="alvts", keep=16, layer=0, selector=selector)
    mine, source = selectors_for(twin, cfg), selectors_for(adapter, cfg)
    assert sorted(mine) == sorted(source) == [0, 1]
    h = torch.randn(1, 12, adapter.text_dims().hidden, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for i in mine:
            x_twin, x_src = (a.decoder.layers[i].input_layernorm(h) for a in (twin, adapter))
            assert not torch.allclose(x_twin, x_src)  # the norm was smoothed ...
            sel_twin = mine[i].factors if selector == "paper" else mine[i]
            sel_src = source[i].factors if selector == "paper" else source[i]
            want = sel_src.logits(x_src, x_src)
            torch.testing.assert_close(sel_twin.logits(x_twin, x_twin), want, rtol=1e-4,
                                       atol=1e-4 * float(want.abs().max()))  # ... and the scores are the same


def test_down_projections_by_module_name(bundles, tmp_path):
    path = tmp_path / "decoder.onnx"
    path.write_bytes((bundles["tiny-llava"] / "decoder.onnx").read_bytes())
    model = onnx.load(str(path))
    assert len(down_projections(model)) == 2
    assert len(down_projections(model, ["layers.1.mlp.down_proj"])) == 1
    assert down_projections(model, []) == []
    with pytest.raises(InternalError, match="layers.7.mlp.down_proj"):
        down_projections(model, ["layers.7.mlp.down_proj"])
    record = quantize_graph(path, "w8a8", ["layers.1.mlp.down_proj"])
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulNBits") == record["blockwise_matmuls"] == 1 and record["smoothquant"]
    assert ops.count("MatMulInteger") == record["dynamic_matmuls"] > 0


def test_w8a8_routed_bundle_finds_its_blockwise_layers_in_every_graph(cache_dir, calib_dir, tmp_path, monkeypatch):
    import vtprune.export.smooth as smooth

    monkeypatch.setattr(smooth, "BLOCKWISE_RATIO", 0.0)  # every down projection block-wise: all must be found
    out = tmp_path / "b"
    export = ExportConfig(weights="w8a8", calib_data=str(calib_dir), calib_n=2, validate=False)  # graphs only
    export_bundle("tiny-llava", PruneConfig(method="alvts", keep=16, layer=1), export, out, cache_dir)
    m = read_manifest(out)
    assert m["smoothing"]["blockwise"] == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    assert m["smoothing"]["calibration"] == {"source": str(calib_dir), "images": 2}
    for graph in ("prefill", "decode"):
        q = m["graphs"][graph]["quantization"]
        assert q["smoothquant"] and q["blockwise_matmuls"] == 2
        assert [n.op_type for n in onnx.load(str(out / f"{graph}.onnx")).graph.node].count("MatMulNBits") == 2


def test_w8a8_calibration_source_is_checked_before_loading(tmp_path):
    with pytest.raises(InputError, match="--calib-data"):
        ExportConfig(weights="w8a8", calib_data=str(tmp_path / "nowhere"))
    ExportConfig(weights="int8", calib_data=str(tmp_path / "nowhere"))  # weight-only formats calibrate nothing
