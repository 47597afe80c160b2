"""Embed and decoder ONNX graphs against the PyTorch pipeline: pruned prefill (gapped positions, M-RoPE for
Qwen), 32-step greedy decode with the KV cache, batch 2, symbolic shapes and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import Tensor

from vtprune.config import PruneConfig
from vtprune.errors import ExportError
from vtprune.export import decoder as export_mod
from vtprune.export.decoder import decoder_names, export_decoder, export_embed
from vtprune.runtime.generate import decode
from vtprune.runtime.pipeline import Prefill, PrunedVlm

ort = pytest.importorskip("onnxruntime")

QUESTION = "what color is the shape ?"
OTHER_QUESTION = "what shape is the color ?"  # same token count as QUESTION
PRUNE = PruneConfig(method="gprune", keep=0.5)
ATOL = 1e-4
STEPS = 32

_EXPORTS: dict[str, dict] = {}


@pytest.fixture
def exported(tiny_adapter, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Embed + decoder graphs of this family, exported once per session, with ORT sessions."""
    family = tiny_adapter.family
    if family not in _EXPORTS:
        out = tmp_path_factory.mktemp(f"onnx-{family}")
        _EXPORTS[family] = {
            "dir": out, "embed_io": export_embed(tiny_adapter, out / "embed.onnx"),
            "decoder_io": export_decoder(tiny_adapter, out / "decoder.onnx"),
            "embed": _session(out / "embed.onnx"), "decoder": _session(out / "decoder.onnx"),
        }  # fmt: skip
    return _EXPORTS[family]


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _prefill(adapter, scene, question: str = QUESTION) -> tuple[PrunedVlm, Prefill]:
    pipe = PrunedVlm(adapter, PRUNE)
    return pipe, pipe.build_prefill(pipe.inputs(scene, question))


def _by_name(entries: list[dict]) -> dict[str, dict]:
    return {e["name"]: {"dtype": e["dtype"], "shape": e["shape"]} for e in entries}


def _empty_past(io: dict, batch: int) -> dict[str, np.ndarray]:
    shape = (batch, io["kv_heads"], 0, io["head_dim"])
    past = [e for e in io["inputs"] if e["name"].startswith("past_key_values.")]
    return {e["name"]: np.zeros(shape, dtype=e["dtype"]) for e in past}


def _step(exp: dict, embeds: np.ndarray, positions: np.ndarray, past: dict[str, np.ndarray]):
    """One decoder call; returns last logits (B, V) and the next past feeds."""
    total = next(iter(past.values())).shape[2] + embeds.shape[1]  # P + S
    mask = np.ones((embeds.shape[0], total), np.int64)
    feeds = {"inputs_embeds": embeds, "position_ids": positions, "attention_mask": mask} | past
    names = [e["name"] for e in exp["decoder_io"]["outputs"]]
    outs = dict(zip(names, exp["decoder"].run(None, feeds), strict=True))
    return outs["logits"][:, -1], {n: outs[n.replace("past_key_values.", "present.")] for n in past}


def _ort_greedy(exp: dict, embeds: Tensor, positions: Tensor, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Prefill (P = 0) then greedy decode, positions continuing one past the largest prompt position.
    Returns the prefill's last logits (B, V) and the tokens (B, steps)."""
    batch = embeds.shape[0]
    logits, past = _step(exp, embeds.numpy(), positions.numpy(), _empty_past(exp["decoder_io"], batch))
    first, token = logits, logits.argmax(-1)[:, None]  # (B, 1)
    next_pos = positions.amax(dim=-1, keepdim=True).numpy() + 1
    tokens = [token]
    for step in range(steps - 1):
        embeds_t = exp["embed"].run(None, {"input_ids": token})[0]
        logits, past = _step(exp, embeds_t, next_pos + step, past)
        token = logits.argmax(-1)[:, None]
        tokens.append(token)
    return first, np.concatenate(tokens, axis=1)


def test_graphs_are_valid_with_symbolic_shapes(tiny_adapter, exported):
    for name in ("embed", "decoder"):
        model = onnx.load(str(exported["dir"] / f"{name}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        io = exported[f"{name}_io"]
        assert json.loads(json.dumps(io)) == io
        assert io["files"] == [f"{name}.onnx"]  # one file, no external data
        for value in model.graph.input:
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == _by_name(io["inputs"])[value.name]["shape"]
    io, d = exported["decoder_io"], tiny_adapter.text_dims()
    rank, dec = io["position_ids_rank"], {k: _by_name(io[k]) for k in ("inputs", "outputs")}
    inputs, outputs = decoder_names(d.layers)
    assert list(dec["inputs"]) == inputs and list(dec["outputs"]) == outputs
    assert dec["inputs"]["inputs_embeds"]["shape"] == ["batch_size", "sequence_length", d.hidden]
    assert dec["inputs"]["position_ids"]["shape"] == [3] * (rank == 3) + ["batch_size", "sequence_length"]
    assert dec["inputs"]["attention_mask"] == {"dtype": "int64", "shape": ["batch_size", "total_sequence_length"]}
    past = ["batch_size", d.kv_heads, "past_sequence_length", d.head_dim]
    assert all(dec["inputs"][n]["shape"] == past for n in inputs[3:])
    assert dec["outputs"]["logits"]["shape"] == ["batch_size", 1, d.vocab]
    present = ["batch_size", d.kv_heads, "past_sequence_length + sequence_length", d.head_dim]
    assert all(dec["outputs"][n]["shape"] == present for n in outputs[1:])
    ids = {"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]}
    assert exported["embed_io"]["inputs"] == [ids]


def test_embed_matches_adapter_exactly(tiny_adapter, exported):
    ids = torch.randint(0, tiny_adapter.text_dims().vocab, (3, 7))
    ours = exported["embed"].run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        ref = tiny_adapter.embed_tokens(ids).numpy()
    assert np.array_equal(ours, ref)


def test_pruned_prefill_and_greedy_decode_match_pytorch(tiny_adapter, scene, exported, monkeypatch):
    pipe, prefill = _prefill(tiny_adapter, scene)
    assert prefill.position_ids.diff(dim=-1).gt(1).any(), "the pruned prefill should have position gaps"
    first, tokens = _ort_greedy(exported, prefill.embeds, prefill.position_ids, STEPS)
    ref_logits = pipe.prompt_logits(prefill)[:, -1].numpy()
    assert np.abs(first - ref_logits).max() <= ATOL
    monkeypatch.setattr(tiny_adapter, "eos_token_ids", lambda: set())
    assert tokens[0].tolist() == decode(pipe, prefill, STEPS)


def test_batch_of_two_prompts(tiny_adapter, scene, exported, monkeypatch):
    (pipe, a), (_, b) = _prefill(tiny_adapter, scene), _prefill(tiny_adapter, scene, OTHER_QUESTION)
    assert a.embeds.shape == b.embeds.shape and not torch.equal(a.embeds, b.embeds)
    embeds = torch.cat([a.embeds, b.embeds])  # (2, n, D)
    positions = torch.cat([a.position_ids, b.position_ids], dim=-2)  # (2, n) or (3, 2, n)
    first, tokens = _ort_greedy(exported, embeds, positions, 8)
    monkeypatch.setattr(tiny_adapter, "eos_token_ids", lambda: set())
    for row, prefill in enumerate((a, b)):
        assert np.abs(first[row] - pipe.prompt_logits(prefill)[0, -1].numpy()).max() <= ATOL
        assert tokens[row].tolist() == decode(pipe, prefill, 8)


class _FakeProgram:
    """Stands in for an ONNXProgram: writes external data and (part of) the model, optionally failing."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def save(self, destination: Path) -> None:
        Path(f"{destination}.data").write_bytes(b"weights")
        destination.write_bytes(b"half a model")
        if self.fail:
            raise OSError("disk full")


def test_save_is_atomic(tmp_path):
    with pytest.raises(OSError, match="disk full"):
        export_mod.save_program_atomic(_FakeProgram(fail=True), tmp_path / "decoder.onnx")
    assert list(tmp_path.iterdir()) == []  # no .onnx, no temp dir
    with pytest.raises(onnx.checker.ValidationError):
        export_mod.save_program_atomic(_FakeProgram(fail=False), tmp_path / "decoder.onnx")  # not a valid model
    assert list(tmp_path.iterdir()) == []
    files = export_mod.save_program_atomic(_FakeProgram(fail=False), tmp_path / "decoder.onnx", check=lambda p: None)
    assert files == ["decoder.onnx", "decoder.onnx.data"]
    assert sorted(f.name for f in tmp_path.iterdir()) == files


def test_exporter_failure_is_an_export_error(tiny_adapter, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("unsupported op\nlong trace")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(ExportError, match="DecoderGraph: unsupported op$"):
        export_decoder(tiny_adapter, tmp_path / "decoder.onnx")
    assert list(tmp_path.iterdir()) == []
