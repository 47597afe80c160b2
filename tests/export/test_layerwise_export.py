"""In-LLM methods in the exported decoder (ALVTS, FastV, DART): routed prefill + per-layer-cache decode
graphs against the PyTorch layer-by-layer decoder, on every tiny family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from vtprune import methods
from vtprune.api import export_bundle
from vtprune.config import PruneConfig
from vtprune.errors import ConfigError, InputError
from vtprune.export.bundle import ExportConfig
from vtprune.manifest import read_manifest
from vtprune.runtime.pipeline import PrunedVlm

ort = pytest.importorskip("onnxruntime")

QUESTION = "what shape is in the image ?"  # the export's sample prompt
ALVTS = PruneConfig("alvts", 8, layer=1)
CASES = {  # (tiny model, config): every family with ALVTS; the other in-LLM variants on one family each
    "llava-alvts": ("tiny-llava", ALVTS),
    "llava_next-alvts": ("tiny-llava-next", ALVTS),
    "qwen-alvts": ("tiny-qwen2.5-vl", ALVTS),
    "llava-alvts-kv-instruction": ("tiny-llava", PruneConfig("alvts", 8, layer=1, skip="kv", query="instruction")),
    "qwen-alvts-paper": ("tiny-qwen2.5-vl", PruneConfig("alvts", 8, layer=0, selector="paper", rank=8)),
    "qwen-fastv": ("tiny-qwen2.5-vl", PruneConfig("fastv", 8, layer=1)),
    "llava_next-dart": ("tiny-llava-next", PruneConfig("dart", 8, layer=1)),
}
EXPORTABLE = {m.name for m in methods.all_methods() if m.where == "in_llm" and m.exportable}
assert {cfg.method for _, cfg in CASES.values()} == EXPORTABLE, "every exportable in-LLM method needs a case"

_BUNDLES: dict[str, Path] = {}


@pytest.fixture(scope="session")
def bundle_of(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    """``bundle_of(case)``: that case's bundle, exported once per session (the export validated it)."""

    def get(name: str) -> Path:
        if name not in _BUNDLES:
            model, cfg = CASES[name]
            _BUNDLES[name] = tmp_path_factory.mktemp("routed") / name
            export_bundle(model, cfg, ExportConfig(), _BUNDLES[name], cache_dir)
        return _BUNDLES[name]

    return get


@pytest.fixture(params=sorted(CASES))
def routed(request: pytest.FixtureRequest, bundle_of):
    """(case, model, config, bundle) for every case."""
    name = request.param
    return name, *CASES[name], bundle_of(name)


def test_routed_bundle_passes_its_validation_layer_by_layer(routed):
    _, _, cfg, bundle = routed
    manifest = read_manifest(bundle)
    assert set(manifest["graphs"]) == {"vision", "embed", "prefill", "decode"}
    checks = {c["check"]: c for c in manifest["validation"]["checks"]}
    assert all(c["ok"] for c in checks.values())
    per_layer = checks["kept visual tokens per routed layer"]
    assert per_layer["layers"] >= 1 and per_layer["identical_layers"] == per_layer["layers"]
    assert checks["prefill logits"]["max_abs_diff"] <= 1e-4
    assert checks["greedy tokens (32 steps)"]["agree_prefix"] == 32  # decode parity with per-layer caches
    routing = manifest["graphs"]["prefill"]["routing"]
    assert routing["method"] == cfg.method and routing["routed_layers"]


def _ort_prefill(bundle: Path, scene):
    from vtprune.backends.ort import OrtVlm
    from vtprune.runtime.timing import StageTimer

    vlm = OrtVlm(bundle)
    pre = vlm.prefill_inputs(vlm.inputs(scene, QUESTION), StageTimer())
    logits, past = vlm.prefill(pre)
    return vlm, pre, logits, past


def test_per_layer_cache_lengths_and_kept_tokens_match_pytorch(routed, tiny_dirs, scene):
    from vtprune.models import load_vlm

    _, model, cfg, bundle = routed
    vlm, pre, logits, past = _ort_prefill(bundle, scene)
    pipe = PrunedVlm(load_vlm(tiny_dirs[model]), cfg)
    ref = pipe.build_prefill(pipe.inputs(vlm._fit_image(scene), QUESTION))
    cache = pipe.new_cache()
    with torch.inference_mode():
        _, hidden = pipe.layerwise_prefill(ref, cache)
        ref_logits = pipe.adapter.lm_head(hidden[:, -1]).float().numpy()
    trace = pipe.last_trace
    lengths = [past[f"past_key_values.{i}.key"].shape[2] for i in range(len(trace.kv_rows))]
    assert lengths == trace.kv_rows == [layer.keys.shape[2] for layer in cache.layers]
    # a full-skip routed layer caches fewer rows than an unrouted one (every layer routes from --layer 0)
    assert len(set(lengths)) == (1 if cfg.skip == "kv" or cfg.layer == 0 else 2)
    assert [s.tolist() for s in pre["selected"]] == [trace.selected[i].tolist() for i in sorted(trace.selected)]
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
    assert vlm.routed_rows(pre)["visual"] == trace.visual  # the ORT report's per-layer tokens
    layers = range(len(trace.kv_rows))  # and its selector MACs, the paper selector's included
    assert vlm.routed_rows(pre)["selector"] == [trace.layer_selector_macs.get(i, 0) for i in layers]
    assert vlm.flops(pre).prefill_macs_pruned == pipe.flops(ref).prefill_macs_pruned


@pytest.mark.parametrize("name", [n for n, (_, cfg) in CASES.items() if cfg.method == "alvts"])
def test_alvts_factors_are_initializers_and_routing_uses_topkroute(bundle_of, name):
    bundle = bundle_of(name)
    model = onnx.load(str(bundle / "prefill.onnx"))
    routing = read_manifest(bundle)["graphs"]["prefill"]["routing"]
    init = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for layer in routing["routed_layers"]:
        (a,) = [shape for name, shape in init.items() if name.endswith(f"alvts_{layer}_a")]
        assert a[1] == routing["selector_ranks"][str(layer)]
    nodes = [n for n in model.graph.node if n.domain == "vtprune" and n.op_type == "TopKRoute"]
    assert len(nodes) == len(routing["routed_layers"])
    assert {f.name for f in model.functions} >= {"TopKRoute"}


def test_prefill_graph_routes_each_batch_row_on_its_own(bundle_of):
    bundle = bundle_of("llava-alvts")
    session = ort.InferenceSession(str(bundle / "prefill.onnx"), providers=["CPUExecutionProvider"])
    io = read_manifest(bundle)["graphs"]["prefill"]
    hidden = next(e for e in io["inputs"] if e["name"] == "inputs_embeds")["shape"][-1]
    n_text, n_visual = 6, io["routing"]["visual_tokens"]
    length = n_text + n_visual
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((2, length, hidden)).astype(np.float32)
    feeds = {"position_ids": np.tile(np.arange(length), (2, 1)), "query_rows": np.array([length - 1]),
             "text_rows": np.r_[0:2, 2 + n_visual : length], "visual_rows": np.arange(2, 2 + n_visual)}  # fmt: skip
    both = session.run(None, feeds | {"inputs_embeds": embeds})
    for row in range(2):
        one = session.run(None, feeds | {"inputs_embeds": embeds[row : row + 1],
                                         "position_ids": feeds["position_ids"][:1]})  # fmt: skip
        for got, want in zip(both, one, strict=True):
            np.testing.assert_allclose(got[row : row + 1], want, atol=1e-5)
    selected = [o.name for o in session.get_outputs()].index("selected.0")
    assert not np.array_equal(both[selected][0], both[selected][1])  # different inputs, different choices


def test_run_and_check_an_alvts_bundle_from_the_cli(bundle_of, png, capsys):
    from vtprune.cli import main

    bundle = bundle_of("qwen-alvts")
    assert main(["run", str(bundle), "--image", str(png), "--prompt", "what?", "--max-new-tokens",
                 "4", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "alvts" and len(report["layer_visual_tokens"]) == 2
    assert report["layer_visual_tokens"][1] == 8 == report["visual_tokens_kept"]
    assert main(["check", str(bundle), "--image", str(png)]) == 0


def test_too_few_visual_tokens_for_the_graph_is_an_input_error(bundle_of):
    from vtprune.backends.ort import OrtVlm

    vlm = OrtVlm(bundle_of("llava-alvts"))
    with pytest.raises(InputError, match="visual tokens"):
        vlm._routing_rows(np.arange(3), np.arange(3, 8), 8)


@pytest.mark.parametrize(("cfg", "match"), [(PruneConfig("alvts", 8, selector="exact"), "selector lowrank")])
def test_unexportable_in_llm_configs_are_refused_before_loading(cfg, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        export_bundle("tiny-llava", cfg, ExportConfig(), tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", ["llava-alvts", "qwen-fastv", "llava_next-dart", "qwen-alvts-paper"])
def test_routed_graphs_build_with_tensorrt_rtx(bundle_of, name, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX (pip install 'vtprune[trt]') is not installed")
    import shutil

    from vtprune.backends.trt.engines import BuildConfig, build_bundle

    copy = tmp_path / "b"
    shutil.copytree(bundle_of(name), copy)
    engines = build_bundle(copy, BuildConfig(target="sm89", max_seq=256, graphs=("prefill", "decode")))
    assert set(engines) == {"prefill", "decode"} and all(e["engine_size"] > 0 for e in engines.values())


def test_fp16_routed_bundle_validates_with_fp16_io(tmp_path, cache_dir):
    bundle = tmp_path / "fp16"
    manifest = export_bundle("tiny-llava", ALVTS, ExportConfig(dtype="fp16"), bundle, cache_dir)
    checks = {c["check"]: c for c in manifest["validation"]["checks"]}
    assert all(c["ok"] for c in checks.values()) and checks["prefill logits"]["cosine"] >= 0.99
    inputs = {e["name"]: e["dtype"] for e in manifest["graphs"]["prefill"]["inputs"]}
    assert inputs["inputs_embeds"] == "float16" and inputs["visual_rows"] == "int64"
    assert any("in-LLM selectors" in part for part in manifest["graphs"]["prefill"]["fp32_parts"])


def test_an_in_llm_bundle_cannot_lend_a_decoder_graph(bundle_of, tmp_path, cache_dir):
    from vtprune.errors import BundleError

    donor = bundle_of("llava-alvts")
    with pytest.raises(BundleError, match="has no decoder graph"):
        export_bundle("tiny-llava", PruneConfig("gprune", 8), ExportConfig(reuse_lm_from=str(donor)),
                      tmp_path / "b", cache_dir)  # fmt: skip
    assert not (tmp_path / "b").exists()
