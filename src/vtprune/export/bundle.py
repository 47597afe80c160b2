"""The bundle's contents: vision/embed/decoder ONNX graphs, processor files and a manifest with every
setting and the sha256 of every file (``write_bundle``). ``api.export_bundle`` writes them into a temp dir
next to the target, validates them and swaps them into place."""

from __future__ import annotations

import datetime
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtprune import __version__
from vtprune.config import PruneConfig
from vtprune.errors import BundleError, ConfigError
from vtprune.export.quantize import SMOOTHED_WEIGHTS, STATIC_WEIGHTS, TRT_WEIGHTS
from vtprune.manifest import FORMAT, PROCESSOR_DIR, SCHEMA_VERSION, read_manifest, write_manifest
from vtprune.prune import group_budgets

DECODERS = ("traced", "fused")  # --decoder: portable ONNX traced from PyTorch, or ONNX Runtime's fused operators


@dataclass(frozen=True)
class ExportConfig:
    """How a bundle is exported."""

    opset: int = 18
    dtype: str = "fp32"
    inline: bool = False
    validate: bool = True
    force: bool = False
    reuse_lm_from: str | None = None  # a bundle of the same model whose embed/decoder graphs are reused
    weights: str | None = None  # int4 / int8 weight-only language model (``export.quantize``)
    vision: str | None = None  # int8 / int8-trt: the vision encoder and projector, static scales (quantize_vision)
    calib_data: str = "easy-vqa"  # what --vision int8 / calibrated --weights calibrate on: easy-vqa or a directory
    calib_n: int = 32
    external_data: bool = False  # every graph's weights in <graph>.onnx.data (always done above 2 GB)
    decoder: str | None = None  # traced | fused (``export.fused``); None: fused for --weights where supported

    def __post_init__(self) -> None:
        from vtprune.export.quantize import check_vision, check_weights

        if not 18 <= self.opset <= 23:
            raise ConfigError(f"--opset {self.opset}: vtprune exports opsets 18..23 (function bodies need >= 18)")
        if self.dtype not in ("fp32", "fp16"):
            raise ConfigError(f"--dtype {self.dtype}: bundles export fp32 or fp16; use --dtype fp16 for half precision")
        check_weights(self.weights, self.dtype)
        check_vision(self.vision, self.dtype, self.calib_n)
        if self.decoder not in (None, *DECODERS):
            raise ConfigError(f"--decoder {self.decoder!r} must be one of {', '.join(DECODERS)}")
        if self.decoder == "fused" and self.weights in TRT_WEIGHTS:
            raise ConfigError(f"--decoder fused with --weights {self.weights}: TensorRT builds the traced decoder; "
                              "drop one")
        if self.calibrated:  # refused before any model is loaded
            from vtprune.images import calibration_images

            calibration_images(self.calib_data, 1)

    def check_method(self, prune: PruneConfig) -> None:
        """Refuse combinations with the pruning method before any work."""
        if self.vision and prune.in_encoder:
            raise ConfigError(f"--vision int8 with --method {prune.method}: the method reads the encoder's own "
                              "layers, which would be quantized too; use another method or no --vision")  # fmt: skip
        if self.weights in STATIC_WEIGHTS and prune.in_llm:
            raise ConfigError(f"--weights {self.weights} with --method {prune.method}: calibrated activations are "
                              "written for the decoder of pre-LLM methods only; use --weights int4-trt, or a "
                              "pre-LLM method")  # fmt: skip

    @property
    def calibrated(self) -> bool:
        """Whether the export calibrates on images (--vision int8; --weights w8a8 / int8-trt's SmoothQuant;
        --weights int8-trt's activation scales)."""
        return self.vision is not None or self.weights in (*SMOOTHED_WEIGHTS, *STATIC_WEIGHTS)

    def decoder_kind(self, adapter: Any, prune: PruneConfig) -> str:
        """``traced`` or ``fused``: the decoder graph this export writes for ``adapter`` (the fused one by
        default for quantized language models, which run only in ONNX Runtime). In-LLM methods route inside
        their prefill graph, which stays traced; their one-token decode graph is the one this picks."""
        from vtprune.export.fused import fused_support

        if self.decoder == "traced" or (self.decoder is None and self.weights in (None, *TRT_WEIGHTS)):
            return "traced"
        reason = fused_support(adapter)
        if reason is not None and self.decoder == "fused":
            raise ConfigError(f"--decoder fused: this model's decoder cannot be fused: {reason}; use --decoder traced")
        return "traced" if reason else "fused"

    @property
    def precision(self) -> str:
        """What the language-model graphs hold: fp32, fp16, int8 or int4 weights."""
        return self.weights or self.dtype


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"vtprune": __version__}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def save_processing_files(adapter: Any, dest: Path) -> None:
    """Tokenizer, processor and model config, so the bundle runs without the original checkpoint."""
    dest.mkdir()
    for part in ("image_processor", "tokenizer"):
        getattr(adapter.processor, part).save_pretrained(dest)
    if hasattr(adapter.processor, "save_pretrained"):
        adapter.processor.save_pretrained(dest)
    adapter.config.save_pretrained(dest)
    for name in ("model.safetensors", "model.safetensors.index.json"):  # weights live in the graphs only
        (dest / name).unlink(missing_ok=True)


def checkpoint_marker(path: Path) -> dict[str, Any] | None:
    """The assembly record of a built-in checkpoint (pocket: which projector), so caches can tell a
    bundle exported from an older build; None for user checkpoints."""
    marker = Path(path) / "vtprune_pocket.json"
    return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None


def new_manifest(adapter: Any, source: str, prune: PruneConfig, export: ExportConfig) -> dict[str, Any]:
    return {
        "format": FORMAT, "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"source": source, "family": adapter.family, "model_type": adapter.config.model_type,
                  "checkpoint_marker": checkpoint_marker(adapter.path)},
        "prune": prune.to_dict(), "export": export.__dict__ | {}, "tools": tool_versions(),
        "processor_dir": PROCESSOR_DIR, "graphs": {},
    }  # fmt: skip


# --- the export command ----------------------------------------------------------------------------
SAMPLE_PROMPT = "what shape is in the image ?"


def _lm_steps(traced: Any, prune: PruneConfig, sample: dict, export: ExportConfig, donor: Any) -> list:
    """The language-model graphs: embed + decoder (pre-LLM), or embed + routed prefill + decode (in-LLM)."""
    from vtprune.export.decoder import export_decoder, export_embed
    from vtprune.export.fused import export_fused_decode, export_fused_decoder

    embed = ("embed", lambda p: donor["embed"](p) if donor else export_embed(traced, p, export.opset))
    if not prune.in_llm:
        writer = export_fused_decoder if export.decoder_kind(traced, prune) == "fused" else export_decoder
        return [embed, ("decoder", lambda p: donor["decoder"](p) if donor else writer(traced, p, export.opset))]
    from vtprune.export.layerwise import export_decode, export_prefill
    from vtprune.runtime.layerwise import layer_budgets
    from vtprune.runtime.pipeline import PrunedVlm

    prefill = PrunedVlm(traced, prune).build_prefill(sample)
    n_visual = int(prefill.visual_rows.numel())
    n_text = int(prefill.embeds.shape[1]) - n_visual
    budgets = layer_budgets(prune, traced, n_text, n_visual)
    decode = export_fused_decode if export.decoder_kind(traced, prune) == "fused" else export_decode
    return [embed, ("prefill", lambda p: export_prefill(traced, prune, budgets, n_text, n_visual, p, export.opset)),
            ("decode", lambda p: decode(traced, p, export.opset))]  # fmt: skip


def write_bundle(
    adapter: Any, model: str, prune: PruneConfig, export: ExportConfig, tmp: Path, log: Any
) -> tuple[dict[str, Any], PruneConfig, Any]:
    """Every graph, the processor files and the manifest of a bundle, into the directory ``tmp``; returns
    the manifest, the pruning config as exported (a ratio turned into its static count) and the sample
    image the graphs were traced with. Validation is ``api.export_bundle``'s next step."""
    import time

    from vtprune.export.memory import release_memory
    from vtprune.export.precision import export_copy, fp32_parts
    from vtprune.export.quantize import QUANTIZED_GRAPHS, quantize_graph, quantize_static_lm
    from vtprune.export.vision import export_vision
    from vtprune.images import scene_image
    from vtprune.runtime.pipeline import PrunedVlm

    image = adapter.export_image(scene_image())
    sample = PrunedVlm(adapter, prune).inputs(image, SAMPLE_PROMPT)
    requested, prune = prune, static_budget(adapter, prune, sample)
    if prune != requested:
        log(f"--keep {requested.keep} is a ratio; exported graphs need a static count: --keep {prune.keep}")
    manifest = new_manifest(adapter, model, prune, export) | {"keep_requested": requested.keep}
    donor = lm_donor(export, model) if export.reuse_lm_from else None
    traced = export_copy(adapter, export.dtype)  # the fp32 ``adapter`` stays the validation reference
    feeds = None  # the decoder's prefill inputs for the calibration images, when its weights are calibrated
    if export.weights in SMOOTHED_WEIGHTS and not export.reuse_lm_from:
        feeds = _calibration_feeds(adapter, prune, export, log)
        traced, manifest["smoothing"] = _smoothed(adapter, feeds, export)
    steps = [("vision", lambda p: export_vision(traced, prune, sample, p, export.opset)),
             *_lm_steps(traced, prune, sample, export, donor)]  # fmt: skip
    for i, (name, fn) in enumerate(steps, 1):
        start = time.perf_counter()
        log(f"[{i}/{len(steps) + int(export.validate)}] exporting {name}.onnx")
        precision = {"dtype": export.dtype, "fp32_parts": fp32_parts(traced, name) if export.dtype != "fp32" else []}
        manifest["graphs"][name] = fn(tmp / f"{name}.onnx") | precision
        if export.weights and name in QUANTIZED_GRAPHS and "reused_from" not in manifest["graphs"][name]:
            blockwise = manifest["smoothing"]["blockwise"] if "smoothing" in manifest else None
            if export.weights not in STATIC_WEIGHTS:
                manifest["graphs"][name]["quantization"] = quantize_graph(tmp / f"{name}.onnx", export.weights,
                                                                          blockwise)  # fmt: skip
            elif name == "decoder":  # (the embed graph's table stays fp32)
                manifest["graphs"][name]["quantization"] = quantize_static_lm(tmp / "decoder.onnx", feeds,
                                                                              export.weights, export.calib_data)
        if name == "vision" and export.vision:
            manifest["graphs"]["vision"]["quantization"] = _quantize_vision(adapter, prune, export, manifest, tmp)
        if export.external_data:
            from vtprune.export.onnx_io import externalize

            manifest["graphs"][name]["files"] = externalize(tmp / f"{name}.onnx")
        log(f"[{i}/{len(steps) + int(export.validate)}] {name}.onnx exported in {time.perf_counter() - start:.1f} s")
        release_memory()  # the exporter's program and buffers, before the next graph is traced
    save_processing_files(adapter, tmp / PROCESSOR_DIR)
    if export.inline:  # the graphs holding vtprune functions
        for name in ("vision", "prefill") if prune.in_llm else ("vision",):
            inline_copy(tmp / f"{name}.onnx", tmp / f"{name}.inlined.onnx")
    write_manifest(tmp, manifest)
    return manifest, prune, image


def _calibration_feeds(adapter: Any, prune: PruneConfig, export: ExportConfig, log: Any) -> list[dict[str, Any]]:
    """--weights w8a8 / int8-trt: the decoder's prefill inputs for ``export.calib_n`` calibration images
    (``export.smooth.prefill_feeds``), which SmoothQuant and int8-trt's activation scales calibrate on."""
    from vtprune.export.smooth import prefill_feeds
    from vtprune.images import calibration_images

    paths = calibration_images(export.calib_data, export.calib_n)
    log(f"calibrating --weights {export.weights} on {len(paths)} images from {export.calib_data}")
    return list(prefill_feeds(adapter, prune, paths))


def _smoothed(adapter: Any, feeds: list[dict[str, Any]], export: ExportConfig) -> tuple[Any, dict[str, Any]]:
    """A copy of the model with SmoothQuant folded into its decoder, calibrated on ``feeds``
    (``export.smooth``); the manifest's record."""
    from vtprune.export.smooth import smoothed_copy

    traced, record = smoothed_copy(adapter, feeds)
    return traced, record | {"calibration": {"source": export.calib_data, "images": len(feeds)}}


def _quantize_vision(
    adapter: Any, prune: PruneConfig, export: ExportConfig, manifest: dict[str, Any], tmp: Path
) -> dict[str, Any]:
    """--vision int8: the vision graph's inputs for ``export.calib_n`` calibration images (the data loader),
    then ``quantize_vision``."""
    from vtprune.export.quantize import quantize_vision
    from vtprune.export.vision import vision_export
    from vtprune.images import calibration_images, load_image
    from vtprune.runtime.pipeline import PrunedVlm

    export.check_method(prune)
    paths = calibration_images(export.calib_data, export.calib_n)
    pipe, meta = PrunedVlm(adapter, prune), manifest["graphs"]["vision"]["meta"]
    feeds = (vision_export(adapter.family).graph_feeds(
        adapter, pipe.inputs(adapter.export_image(load_image(p, adapter.min_image_side)), SAMPLE_PROMPT), meta)
        for p in paths)  # fmt: skip; export_image: the graph's input size where it is fixed (Qwen2.5-VL)
    return quantize_vision(tmp / "vision.onnx", feeds, export.calib_data, export.vision)


def lm_donor(export: ExportConfig, model: str) -> dict[str, Any]:
    """Copiers for the embed/decoder graphs of another bundle of the same model (they do not depend on
    the pruning config), after checking that bundle's integrity and settings."""
    src = Path(export.reuse_lm_from)
    manifest = read_manifest(src)
    done = manifest["export"]
    had = (manifest["model"]["source"], done["opset"], done.get("weights") or done.get("dtype", "fp32"))
    if had != (model, export.opset, export.precision):
        raise BundleError(f"--reuse-lm-from {src} was exported from {had[0]} at opset {had[1]} in {had[2]}, "
                          f"not {model} at opset {export.opset} in {export.precision}")  # fmt: skip
    if manifest["tools"] != tool_versions():
        raise BundleError(f"--reuse-lm-from {src} was exported with other tool versions; re-export it")
    kind = "fused" if manifest["graphs"].get("decoder", {}).get("exporter") == "fused" else "traced"
    if export.decoder not in (None, kind):
        raise BundleError(f"--reuse-lm-from {src} has a {kind} decoder, not --decoder {export.decoder}")

    def copier(graph: str) -> Any:
        def copy(dest: Path) -> dict[str, Any]:
            if graph not in manifest["graphs"]:
                raise BundleError(f"--reuse-lm-from {src} has no {graph} graph (it prunes inside the decoder); "
                                  "reuse a bundle of a pre-LLM method")  # fmt: skip
            for name in manifest["graphs"][graph].get("files", [f"{graph}.onnx"]):  # the graph and its data file
                try:
                    os.link(src / name, dest.parent / name)  # same bytes, no extra disk
                except OSError:
                    shutil.copyfile(src / name, dest.parent / name)
            return manifest["graphs"][graph] | {"reused_from": str(src)}

        return copy

    return {"embed": copier("embed"), "decoder": copier("decoder")}


def static_budget(adapter: Any, prune: PruneConfig, sample: dict) -> PruneConfig:
    """A ratio budget turned into the fixed count it means at full capacity (static graph shapes)."""
    import dataclasses

    import torch

    if not isinstance(prune.keep, float):
        return prune
    with torch.inference_mode():
        layout = adapter.encode_image(sample).layout
    k = sum(group_budgets(layout.group_capacities, prune.keep))
    return dataclasses.replace(prune, keep=k)


def inline_copy(src: Path, dst: Path) -> None:
    """A copy of ``src`` with the vtprune function bodies inlined, for runtimes without local functions."""
    import onnx
    import onnx.inliner

    from vtprune.export.onnx_io import save_atomic

    save_atomic(onnx.inliner.inline_local_functions(onnx.load(str(src))), dst)
