"""Checks on a local Hugging Face checkpoint directory before transformers touches it.

Safetensors only by default: pickle weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) can run code
when loaded, so they are refused unless the caller allows them explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vtprune.errors import CheckpointError, PickleWeightsError
from vtprune.files import read_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_config(path: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict, with errors that say what to fix."""
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face checkpoint directory?")
    cfg = read_json(cfg_file, CheckpointError, "re-download or re-save the checkpoint")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise CheckpointError(f"{cfg_file} has no 'model_type' string; it is not a transformers model config")
    return cfg


def check_config_keys(path: Path, cfg: dict[str, Any], required: tuple[str, ...]) -> None:
    """Refuse a config missing the sub-configs its family needs (transformers would silently build a
    full-size default model from such a config)."""
    missing = [k for k in required if not isinstance(cfg.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path / 'config.json'} lacks {', '.join(missing)}; the config is incomplete")


def check_weights(path: Path, allow_pickle: bool) -> str:
    """Return ``safetensors`` or ``pickle`` for the weights found, refusing pickle unless allowed."""
    if any(path.glob("*.safetensors")):
        return "safetensors"
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        if not allow_pickle:
            raise PickleWeightsError(
                f"{path} holds only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded; "
                "convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
        return "pickle"
    raise CheckpointError(f"{path} has no weights (*.safetensors); the checkpoint is incomplete")
