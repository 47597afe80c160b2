"""The fused decoder (``export.fused``): ONNX Runtime's GroupQueryAttention / RotaryEmbedding / skip-RMSNorm
graph computes what the traced decoder computes, and the runtime's in-place KV cache decodes what the
copying one decodes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vtprune.api import export_bundle
from vtprune.config import PruneConfig
from vtprune.export.bundle import ExportConfig
from vtprune.manifest import read_manifest

PROMPT = "what is in the image ?"


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts)


def _feeds(d, past_len: int, new: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random embeddings at position ids with gaps (as after pruning), a past of ``past_len`` rows."""
    positions = np.sort(rng.choice(np.arange(past_len + 3, past_len + 3 + 4 * new), new, replace=False))
    feeds = {"inputs_embeds": rng.standard_normal((1, new, d.hidden), dtype=np.float32),
             "position_ids": positions[None].astype(np.int64),
             "attention_mask": np.ones((1, past_len + new), np.int64)}  # fmt: skip
    for i in range(d.layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((1, d.kv_heads, past_len, d.head_dim),
                                                                       dtype=np.float32)  # fmt: skip
    return feeds


@pytest.fixture(scope="module")
def llava(tiny_dirs):
    from vtprune.models import load_vlm

    return load_vlm(str(tiny_dirs["tiny-llava"]))


@pytest.mark.parametrize("past_len,new", [(0, 9), (7, 1), (5, 4)])
def test_fused_decoder_computes_what_the_traced_one_does(llava, tmp_path, past_len, new):
    from vtprune.export.decoder import export_decoder
    from vtprune.export.fused import export_fused_decoder

    spec = export_fused_decoder(llava, tmp_path / "fused" / "decoder.onnx")
    export_decoder(llava, tmp_path / "traced" / "decoder.onnx")
    assert spec["exporter"] == "fused" and spec["logits"] == "last_position"
    feeds = _feeds(llava.text_dims(), past_len, new, np.random.default_rng(past_len))
    fused, traced = _session(tmp_path / "fused" / "decoder.onnx"), _session(tmp_path / "traced" / "decoder.onnx")
    assert [i.name for i in fused.get_inputs()] == [i.name for i in traced.get_inputs()]
    assert [o.name for o in fused.get_outputs()] == [o.name for o in traced.get_outputs()]
    for a, b in zip(fused.run(None, feeds), traced.run(None, feeds), strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4  # logits (1, 1, V), then every present


def test_fused_decode_graph_takes_a_cache_of_its_own_length_per_layer(llava, tmp_path):
    """In-LLM bundles' one-token decode graph: routed layers hold fewer rows; the fused graph reads each
    layer's length from ``cache_lengths`` and computes what the traced per-layer decode graph does."""
    from vtprune.export.fused import export_fused_decode
    from vtprune.export.layerwise import export_decode

    d = llava.text_dims()
    spec = export_fused_decode(llava, tmp_path / "fused" / "decode.onnx")
    export_decode(llava, tmp_path / "traced" / "decode.onnx")
    assert spec["exporter"] == "fused" and spec["graph"] == "decode"
    rng = np.random.default_rng(3)
    lengths = [9 - 2 * (i % 3) for i in range(d.layers)]  # distinct lengths, as after routing
    feeds = {"inputs_embeds": rng.standard_normal((1, 1, d.hidden), dtype=np.float32),
             "position_ids": np.array([[17]], np.int64)}  # fmt: skip
    for i, n in enumerate(lengths):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((1, d.kv_heads, n, d.head_dim),
                                                                       dtype=np.float32)  # fmt: skip
    fused, traced = _session(tmp_path / "fused" / "decode.onnx"), _session(tmp_path / "traced" / "decode.onnx")
    want = traced.run(None, feeds)
    got = fused.run(None, feeds | {"cache_lengths": np.array([lengths], np.int64)})
    assert [o.name for o in fused.get_outputs()] == [o.name for o in traced.get_outputs()]
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4


def test_fused_decoder_holds_qwen2_biases_and_few_nodes(tmp_path):
    """A Qwen2 decoder (q/k/v biases) against transformers itself, through a minimal adapter."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vtprune.export.fused import build_fused_decoder, fused_support
    from vtprune.models.base import TextDims

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    lm = Qwen2ForCausalLM(cfg).eval()
    for layer in lm.model.layers:  # random biases (zeros at init would not test them)
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(proj.bias, std=0.5)
    dims = TextDims(layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16, vocab=96)
    adapter = SimpleNamespace(text_config=cfg, decoder=lm.model, lm_head=lm.lm_head, text_dims=lambda: dims)
    assert fused_support(adapter) is None
    model = build_fused_decoder(adapter)
    assert len(model.graph.node) <= 16 * dims.layers + 12  # (the traced graph: ~60 per layer)
    import onnx

    onnx.save(model, str(tmp_path / "d.onnx"))
    feeds = _feeds(dims, 0, 6, np.random.default_rng(1))
    got = _session(tmp_path / "d.onnx").run(None, feeds)[0]
    with torch.no_grad():
        want = lm(inputs_embeds=torch.from_numpy(feeds["inputs_embeds"]),
                  position_ids=torch.from_numpy(feeds["position_ids"])).logits[:, -1:].numpy()  # fmt: skip
    assert np.abs(got - want).max() < 1e-4


def test_fused_support_names_what_it_cannot_write(tiny_dirs):
    from vtprune.export.fused import fused_support
    from vtprune.models import load_vlm

    assert "M-RoPE" in fused_support(load_vlm(str(tiny_dirs["tiny-qwen2.5-vl"])))


@pytest.fixture(scope="module")
def fused_bundle(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("fused") / "b"
    export_bundle("tiny-llava", PruneConfig(method="gprune", keep=16), ExportConfig(decoder="fused"), out, cache_dir)
    return out


def test_fused_bundle_validates_and_decodes_in_place_like_the_copying_cache(fused_bundle, scene, monkeypatch):
    from vtprune.backends import ort as backend

    m = read_manifest(fused_bundle)
    assert m["graphs"]["decoder"]["exporter"] == "fused" and all(r["ok"] for r in m["validation"]["checks"])
    monkeypatch.setattr(backend, "KV_ROOM", 3)  # the shared cache regrows twice within 12 tokens
    vlm = backend.OrtVlm(fused_bundle)
    assert vlm.shared_kv
    record = vlm.prefill_inputs(vlm.inputs(scene, PROMPT), vlm.timer())
    logits, state = vlm.first_logits(record)
    shared = [logits]
    position = vlm.next_position(record)
    for i in range(12):
        row, state = vlm.next_logits(int(np.argmax(shared[-1])), position + i, state)
        shared.append(row)
    assert isinstance(state, backend.SharedKv) and state.capacity >= state.length == record["embeds"].shape[1] + 12
    vlm.shared_kv = False
    logits, past = vlm.first_logits(record)
    copying = [logits]
    for i in range(12):
        row, past = vlm.next_logits(int(np.argmax(shared[i])), position + i, past)  # the same tokens
        copying.append(row)
    assert max(np.abs(a - b).max() for a, b in zip(shared, copying, strict=True)) < 1e-5


def test_prefix_cache_in_the_shared_buffers_survives_the_prompts_after_it(fused_bundle, scene):
    """Each prompt writes its image and question rows over the last one's, past the cached prefix."""
    from tests.runtime.test_prefix_cache import decided
    from vtprune.backends.ort import OrtVlm, SharedKv

    cached, whole = OrtVlm(fused_bundle), OrtVlm(fused_bundle, prefix_cache=False)
    other = Image.fromarray(255 - np.asarray(scene))
    for i, image in enumerate([scene, other, scene, other]):
        a = cached.generate(image, PROMPT, max_new_tokens=8)
        want = decided(whole, image, 8, PROMPT)  # up to a near-tie, which any CPU's rounding may flip
        assert a.token_ids[: len(want)] == want and len(want) >= 2
        assert a.cached_tokens == (0 if i == 0 else cached._prefix[1].length)
    assert isinstance(cached._prefix[1], SharedKv) and a.cached_tokens > 0


def test_shared_cache_rewinds_for_candidate_scores(fused_bundle, scene):
    """Candidate answers are teacher-forced depth first and rewound; an in-place cache must give the same
    log-likelihoods as the copying one."""
    from vtprune.backends.ort import OrtVlm
    from vtprune.runtime.generate import CandidateScores, decode

    vlm = OrtVlm(fused_bundle)
    record = vlm.prefill_inputs(vlm.inputs(scene, PROMPT), vlm.timer())
    candidates = [[5, 6, 7], [5, 6, 9], [5, 8], [11, 12]]
    results = []
    for shared in (True, False):
        vlm.shared_kv = shared
        scores = CandidateScores(candidates)
        tokens = decode(vlm, record, 6, eos=set(), scores=scores)
        results.append((tokens, scores.logprobs))
    assert results[0][0] == results[1][0]
    assert np.allclose(results[0][1], results[1][1], atol=1e-4)


def test_routed_bundle_decodes_with_the_fused_graph_in_place(tmp_path, cache_dir, scene, monkeypatch):
    """ALVTS with --decoder fused: the routed prefill stays traced, the decode graph is fused; its shared
    cache (each layer its own length, regrown when full) decodes what the copying cache decodes."""
    from vtprune.backends import ort as backend

    out = tmp_path / "alvts"
    cfg = PruneConfig(method="alvts", keep=16, layer=1)
    export_bundle("tiny-llava", cfg, ExportConfig(decoder="fused"), out, cache_dir)
    m = read_manifest(out)
    assert m["graphs"]["decode"]["exporter"] == "fused" and m["graphs"]["prefill"]["exporter"] != "fused"
    assert all(r["ok"] for r in m["validation"]["checks"])
    monkeypatch.setattr(backend, "KV_ROOM", 3)
    vlm = backend.OrtVlm(out)
    assert vlm.shared_kv and vlm.routing
    record = vlm.prefill_inputs(vlm.inputs(scene, PROMPT), vlm.timer())
    runs = []
    for shared in (True, False):
        vlm.shared_kv = shared
        logits, state = vlm.first_logits(record)
        first, rows, position = state, [logits], vlm.next_position(record)
        for i in range(8):
            token = int(np.argmax(runs[0][i])) if runs else int(np.argmax(rows[-1]))
            row, state = vlm.next_logits(token, position + i, state)
            rows.append(row)
        runs.append(rows)
        if shared:
            assert len(set(state.lengths.tolist())) > 1, "routed layers hold fewer rows"
            assert state.arrays is not first.arrays and np.all(state.lengths == first.lengths + 8)
    assert max(np.abs(a - b).max() for a, b in zip(*runs, strict=True)) < 1e-5


def test_fused_decoder_is_refused_where_it_cannot_serve_in_one_line(tmp_path, capsys):
    from vtprune.cli import main

    flags, message = ["--weights", "int4-trt"], "--decoder fused with --weights int4-trt"
    code = main(["export", "--model", "tiny-llava", "--out", str(tmp_path / "r"), "--decoder", "fused", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "r").exists()


def test_build_refuses_the_fused_decoder_in_one_line(fused_bundle, tmp_path, capsys):
    import shutil

    from vtprune.cli import main

    bundle = tmp_path / "f"
    shutil.copytree(fused_bundle, bundle)
    code = main(["build", str(bundle), "--graphs", "decoder"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fused decoder" in err[0] and "--decoder traced" in err[0]
    assert not list(bundle.glob("*.engine"))
