"""The calibrated ALVTS selectors' file format (``vtprune calib alvts`` writes it, the ALVTS router reads it):
``factors.safetensors`` (per layer ``a``, ``b``, ``u``) and ``card.json`` (settings, per-layer scales and
recall, the factors' sha256, checked when loaded, and the model shape they fit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vtprune import outputs
from vtprune.errors import CheckpointError, ConfigError, InputError
from vtprune.files import read_json, sha256_file
from vtprune.prune.alvts import LayerSelector

FACTORS_FILE, CARD_FILE = "factors.safetensors", "card.json"


def save_factors(selectors: dict[int, LayerSelector], card: dict[str, Any], out: Path, force: bool = False) -> Path:
    """Write ``factors.safetensors`` + ``card.json`` atomically into ``out`` (replaced only with ``force``)."""
    from safetensors.torch import save_file

    with outputs.atomic_dir(Path(out), "factors", force, InputError) as tmp:
        tensors = {}
        for li, s in selectors.items():
            tensors |= {f"layer{li}.a": s.a.contiguous(), f"layer{li}.b": s.b.contiguous(), f"layer{li}.u": s.u}
        save_file(tensors, str(tmp / FACTORS_FILE))
        card = card | {"scales": {str(li): s.scale for li, s in selectors.items()},
                       "sha256": sha256_file(tmp / FACTORS_FILE)}  # fmt: skip
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return Path(out)


def load_factors(path: str | Path, adapter: Any, kind: str = "calibrated") -> dict[int, LayerSelector]:
    """Selectors from a ``save_factors`` directory, checked against its sha256, the model's shape and the
    selector ``kind`` they were fitted for (``calibrated``: whitened low-rank; ``paper``: the paper's
    W_Q / W_K factors, ``vtprune calib alvts --mode paper``)."""
    from safetensors.torch import load_file

    root = Path(path)
    if not (root / FACTORS_FILE).is_file() or not (root / CARD_FILE).is_file():
        raise InputError(f"--factors {root}: not a 'vtprune calib alvts' output ({FACTORS_FILE} + {CARD_FILE})")
    card = read_json(root / CARD_FILE, CheckpointError, "re-run vtprune calib alvts")
    digest = sha256_file(root / FACTORS_FILE)
    if digest != card.get("sha256"):
        raise CheckpointError(f"--factors {root}: {FACTORS_FILE} does not match the sha256 in {CARD_FILE}")
    if card.get("kind", "calibrated") != kind:
        want = "--selector paper" if card.get("kind") == "paper" else "--selector lowrank"
        raise ConfigError(f"--factors {root} were fitted for another selector ({card.get('kind')}); use them with "
                          f"{want}")  # fmt: skip
    dims = adapter.text_dims()
    model = card.get("model", {})
    if (model.get("hidden"), model.get("layers")) != (dims.hidden, dims.layers):
        raise ConfigError(
            f"--factors {root} were calibrated for hidden={model.get('hidden')} layers={model.get('layers')}, "
            f"this model has hidden={dims.hidden} layers={dims.layers}"
        )
    tensors = load_file(str(root / FACTORS_FILE))
    return {int(li): LayerSelector(tensors[f"layer{li}.a"], tensors[f"layer{li}.b"], tensors[f"layer{li}.u"], scale)
            for li, scale in card["scales"].items()}  # fmt: skip
