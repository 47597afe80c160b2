"""Whole jobs for the library (the CLI is a shell over these): export a validated bundle, and open a runner
on a bundle (ONNX Runtime, TensorRT) or a checkpoint (PyTorch) that ``runtime.generate`` drives.

    from vtprune.api import export_bundle, open_runner
    export_bundle("pocket", PruneConfig(method="gprune", keep=64), ExportConfig(), Path("bundle"))
    with open_runner("bundle") as vlm:
        print(vlm.generate(image, "what is the red shape?").answer)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vtprune import outputs
from vtprune.config import PruneConfig, SamplingConfig
from vtprune.errors import BundleError, ConfigError
from vtprune.export.bundle import SAMPLE_PROMPT, ExportConfig, write_bundle
from vtprune.manifest import write_manifest

BACKENDS = ("ort", "trt", "torch")


def export_bundle(
    model: str, prune: PruneConfig, export: ExportConfig, out: Path, cache_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Export ``model`` with ``prune`` into the bundle directory ``out``, validated against PyTorch (unless
    ``export.validate`` is off) before it is swapped into place; returns the manifest."""
    from vtprune.check.validate import validate_bundle
    from vtprune.export.layerwise import check_exportable
    from vtprune.export.memory import plan_export
    from vtprune.export.quantize import SMOOTHED_WEIGHTS
    from vtprune.models import load_vlm

    log = log or (lambda msg: None)
    check_exportable(prune)
    export.check_method(prune)
    plan = plan_export(Path(model), export.dtype, export.validate, smoothing=export.weights in SMOOTHED_WEIGHTS)
    if plan.slice_validation and prune.in_llm:
        raise ConfigError(f"--method {prune.method} at {plan.parameters / 1e9:.1f} B parameters: validating its routed "
                          "prefill graph needs the whole model in ONNX Runtime, which does not fit this machine; "
                          "pass --no-validate, or export on a larger one")  # fmt: skip
    if plan.parameters and not export.reuse_lm_from:  # the graphs hold every weight once in the export dtype
        outputs.check_free_space(Path(out), int(plan.parameters * (2 if export.dtype == "fp16" else 4) * 1.05),
                                 BundleError)  # fmt: skip
    with outputs.atomic_dir(Path(out), "bundle", export.force, BundleError) as tmp:
        if plan.lean:
            log(f"loading {model} in {export.dtype} ({plan.parameters / 1e9:.2f} B parameters: an fp32 reference "
                f"beside it would not fit {plan.available / 1e9:.0f} GB; the {export.dtype} model is the reference)")
        else:
            log(f"loading {model}")
        adapter = load_vlm(model, dtype=export.dtype if plan.lean else "fp32", cache_dir=cache_dir)
        manifest, exported, image = write_bundle(adapter, model, prune, export, tmp, log)
        manifest["export_memory"] = plan.to_dict()
        if export.validate:
            start, n = time.perf_counter(), len(manifest["graphs"]) + 1
            if plan.slice_validation:
                from vtprune.check.validate import validate_slice

                log("validating a slice: the full bundle in ONNX Runtime beside the reference would not fit")
                manifest["validation"] = validate_slice(adapter, exported, tmp, image, SAMPLE_PROMPT)
            else:
                manifest["validation"] = validate_bundle(adapter, exported, tmp, image, SAMPLE_PROMPT)
            log(f"[{n}/{n}] validated against PyTorch in {time.perf_counter() - start:.1f} s")
        write_manifest(tmp, manifest)
        return manifest


@contextlib.contextmanager
def open_runner(
    source: str | Path, backend: str = "ort", *, provider: str = "cpu", threads: int | None = None,
    sampling: SamplingConfig | None = None, prune: PruneConfig | None = None, dtype: str = "fp32",
    device: str = "cpu", cache_dir: Path | None = None, allow_pickle: bool = False, prefix_cache: bool = True,
) -> Iterator[Any]:  # fmt: skip
    """A runner for ``runtime.generate``: a bundle directory on ONNX Runtime (``ort``, ``provider`` cpu |
    cuda | tensorrt) or as TensorRT engines (``trt``), or a checkpoint in PyTorch (``torch``, with
    ``prune``). ``prefix_cache``: ONNX Runtime keeps the keys and values of the prompt's text before the image
    for the next prompt (``OrtVlm``). Closed (sessions and engines released) when the block ends."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} must be one of {', '.join(BACKENDS)}")
    if backend == "torch":
        from vtprune.models import load_vlm
        from vtprune.runtime.pipeline import PrunedVlm

        adapter = load_vlm(str(source), dtype, allow_pickle, cache_dir, device)
        runner = PrunedVlm(adapter, prune or PruneConfig(), sampling)
    elif backend == "trt":
        from vtprune.backends.trt.runner import TrtVlm

        runner = TrtVlm(source, sampling=sampling)
    else:
        from vtprune.backends.ort import OrtVlm

        runner = OrtVlm(source, provider, threads, sampling=sampling, prefix_cache=prefix_cache)
    try:
        yield runner
    finally:
        close = getattr(runner, "close", None)
        if close is not None:
            close()
