"""``vtprune build``: TensorRT engines for a bundle's graphs, with metadata, written atomically.

Profiles come from the bundle's symbolic ONNX dims: batch up to ``max_batch``; decoder prompts up to
``max_seq`` new tokens and a KV cache up to ``max_seq`` so one decoder engine serves every budget and
the unpruned A/B. Each engine gets ``<graph>.engine.json`` (TensorRT flavour and version, target,
precision, profiles, sha256 of the source ONNX, the timing cache used) and the manifest records it.
Engines are built into a temporary folder and renamed into the bundle only when every graph built, so an
error or a Ctrl-C (the progress monitor cancels TensorRT's build) leaves no partial engine behind.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vtprune import outputs
from vtprune.errors import BundleError, ConfigError

GRAPHS = ("vision", "embed", "decoder", "prefill", "decode")  # in-LLM bundles: prefill + decode


@dataclass(frozen=True)
class BuildConfig:
    """Settings of one engine build (``vtprune build`` flags map 1:1)."""

    precision: str = "fp32"
    target: str | None = None
    workspace_mb: int | None = None
    max_batch: int = 1
    max_seq: int | None = None  # default: the model's max positions, capped at 4096
    graphs: tuple[str, ...] | None = None  # None: every graph the bundle has
    force: bool = False
    timing_cache: Path | None = None  # loaded if present, shared by the graphs, rewritten after each build
    plugins: bool = False  # fused plugins for the vtprune ops (full TensorRT only) instead of function bodies

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch {self.max_batch} must be at least 1")
        if self.max_seq is not None and self.max_seq < 2:
            raise ConfigError(f"--max-seq {self.max_seq} must be at least 2")
        unknown = set(self.graphs or ()) - set(GRAPHS)
        if unknown or self.graphs == ():
            raise ConfigError(f"--graphs must name some of {', '.join(GRAPHS)}; got {', '.join(self.graphs)}")


def build_bundle(bundle: Path, cfg: BuildConfig, log: Any = None) -> dict[str, Any]:
    """Build engines for ``bundle``'s graphs; returns the manifest's new ``engines`` section."""
    from vtprune.backends.trt.build import build_engine, import_tensorrt, require_plugins
    from vtprune.backends.trt.profiles import ProfileLimits, profiles_from_onnx
    from vtprune.files import sha256_file as sha256
    from vtprune.manifest import Sealed, read_manifest, write_manifest

    log = log or (lambda msg: None)
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    graphs = [g for g in GRAPHS if g in manifest["graphs"]] if cfg.graphs is None else list(cfg.graphs)
    missing = [g for g in graphs if g not in manifest["graphs"]]
    if missing:
        raise ConfigError(f"--graphs {','.join(missing)}: {bundle} has only {', '.join(manifest['graphs'])}")
    quantized = [g for g in graphs if "quantization" in manifest["graphs"][g]
                 and manifest["graphs"][g]["quantization"].get("form") != "qdq"]  # --weights int4-trt: Q/DQ
    if "vision" in quantized and manifest["graphs"]["vision"]["quantization"]["vision"] == "int8-trt":
        quantized.remove("vision")  # symmetric int8 Q/DQ: TensorRT's explicit quantization
    if "vision" in quantized:
        raise ConfigError(f"{bundle}: vision.onnx holds ONNX Runtime's int8 form (uint8 activations), which "
                          "TensorRT does not take; export with --vision int8-trt, or build the other graphs "
                          "(--graphs)")  # fmt: skip
    if quantized:
        weights = manifest["export"].get("weights")
        raise ConfigError(f"{bundle}: {', '.join(quantized)} hold ONNX Runtime's {weights} MatMulNBits weights, which "
                          "TensorRT cannot parse; export with --weights int4-trt (Q/DQ), or build the vision graph "
                          "alone (--graphs vision)")  # fmt: skip
    fused = [g for g in ("decoder", "decode") if g in graphs and manifest["graphs"][g].get("exporter") == "fused"]
    if fused:
        raise ConfigError(f"{bundle}: {fused[0]}.onnx is the fused decoder (ONNX Runtime's contrib operators), which "
                          "TensorRT cannot parse; export with --decoder traced, or build the other graphs (--graphs)")
    existing = [g for g in graphs if (bundle / f"{g}.engine").exists()]
    if existing and not cfg.force:
        raise BundleError(f"{bundle} already has {', '.join(existing)} engine(s); pass --force to rebuild")
    max_seq = cfg.max_seq or _model_max_positions(Sealed(bundle).read_json(f"{manifest['processor_dir']}/config.json"))
    precision = bundle_precision(cfg.precision, manifest["export"].get("dtype", "fp32"), log)
    routing = manifest["graphs"].get("prefill", {}).get("routing")
    visual = (routing["min_visual_tokens"], routing["visual_tokens"], max(routing["visual_tokens"], max_seq)) \
        if routing else None  # fmt: skip
    vision_meta = manifest["graphs"].get("vision", {}).get("meta", {})
    merged = (vision_meta["min_tokens"], min(max(256, vision_meta["min_tokens"]), vision_meta["max_tokens"]),
              vision_meta["max_tokens"]) if vision_meta.get("dynamic_grid") else (1, 256, 1280)  # fmt: skip
    limits = ProfileLimits(batch=(1, 1, cfg.max_batch), sequence=(1, min(64, max_seq), max_seq),
                           past=(0, max_seq // 2, max_seq), visual=visual, merged=merged)  # fmt: skip
    plugin_graphs = {g for g in graphs if _has_vtprune_ops(bundle / f"{g}.onnx")} if cfg.plugins else set()
    if cfg.plugins and not plugin_graphs:
        raise ConfigError(f"--plugins: no graph of {', '.join(graphs)} has a vtprune op (GraphPropagate, TopKRoute)")
    if cfg.plugins:
        require_plugins(*import_tensorrt())  # refused before any graph is built
    check_build_memory(bundle, manifest, graphs)
    engines = dict(manifest.get("engines", {}))
    # The bundle is rebuilt beside itself from hard links, then swapped in: engines and manifest change
    # together or not at all (files in it are replaced, never written in place: they share the old inodes).
    with outputs.atomic_dir(bundle, "bundle", True, BundleError, seed=True) as tmp:
        for i, graph in enumerate(graphs, 1):
            onnx_path = bundle / f"{graph}.onnx"
            log(f"[{i}/{len(graphs)}] building {graph}.engine ...")
            result = build_engine(onnx_path, profiles_from_onnx(onnx_path, limits), precision, cfg.target,
                                  cfg.workspace_mb, cfg.timing_cache, lambda msg: log(f"      {msg}"),
                                  graph in plugin_graphs)  # fmt: skip
            settings = asdict(cfg) | {"max_seq": max_seq, "timing_cache": cfg.timing_cache and str(cfg.timing_cache)}
            meta = result.to_dict() | {"onnx_sha256": sha256(onnx_path), "build": settings}
            outputs.write_file_atomic(tmp / f"{graph}.engine", result.engine)
            outputs.write_file_atomic(tmp / f"{graph}.engine.json",
                                      (json.dumps(meta, indent=2, default=list) + "\n").encode())  # fmt: skip
            engines[graph] = {k: meta[k] for k in ("flavour", "trt_version", "target", "precision", "engine_size",
                                                   "plugins")}  # fmt: skip
            log(f"      {result.engine_size / 1e6:.1f} MB in {result.build_seconds:.1f} s ({result.flavour})")
        manifest["engines"] = engines
        write_manifest(tmp, manifest)
    return engines


# Host memory of a TensorRT(-RTX) build, per byte of the graph's weights: the parsed network holds them and
# the engine being serialized holds them again (TensorRT-RTX 1.7 on the CPU, Qwen2.5-VL-3B fp16: 13.1 GB
# for the 6.2 GB decoder, 3.5 GB for the 1.5 GB vision graph; benchmarks/results/scale).
BUILD_BYTES_PER_WEIGHT_BYTE = 2.2
BUILD_HEADROOM = 1 << 30


def check_build_memory(bundle: Path, manifest: dict[str, Any], graphs: list[str]) -> None:
    """Refuse, before anything is built, a graph whose build would not fit the memory available, with
    the estimated need (builds run one graph at a time)."""
    from vtprune.export.memory import available_memory

    avail = available_memory()
    for graph in graphs:
        files = manifest["graphs"][graph].get("files", [f"{graph}.onnx"])
        size = sum((bundle / f).stat().st_size for f in files if (bundle / f).is_file())
        need = int(size * BUILD_BYTES_PER_WEIGHT_BYTE) + BUILD_HEADROOM
        if need > avail:
            raise ConfigError(f"building {graph}.engine from {size / 1e9:.1f} GB of weights needs about "
                              f"{need / 1e9:.0f} GB of host memory and {avail / 1e9:.0f} GB is available; build on "
                              "a larger host (engines for another GPU build anywhere with --target)")  # fmt: skip


def _has_vtprune_ops(path: Path) -> bool:
    import onnx

    from vtprune.export.ops import DOMAIN

    return any(node.domain == DOMAIN for node in onnx.load(str(path), load_external_data=False).graph.node)


def bundle_precision(requested: str, dtype: str, log: Any) -> str:
    """The builder precision for a bundle of ``dtype``: graphs exported in fp16 carry their precision in their
    tensor types, so the default ``fp32`` request becomes a strongly typed build (full TensorRT would
    otherwise run those layers in fp32)."""
    if dtype == "fp32" or requested != "fp32":
        return requested
    log(f"{dtype} bundle: building strongly typed (precision 'typed'), so layers keep the graphs' {dtype} types")
    return "typed"


def _model_max_positions(cfg: dict[str, Any]) -> int:
    text = cfg.get("text_config") or cfg
    return int(min(text.get("max_position_embeddings") or 4096, 4096))


def check_engine_compat(meta: dict[str, Any], flavour: str, trt_version: str, device_sm: str | None) -> None:
    """Refuse an engine built by another TensorRT flavour/version or for another GPU, naming both."""
    if (meta["flavour"], meta["trt_version"]) != (flavour, trt_version):
        raise BundleError(
            f"engine built with {meta['flavour']} {meta['trt_version']} cannot load in {flavour} {trt_version}; "
            "rebuild it on this machine with 'vtprune build --force'"
        )
    targets = [t for t in (meta.get("target") or "").split(",") if t and t != "native"]
    if device_sm and targets and device_sm not in targets:
        raise BundleError(
            f"engine built for {','.join(targets)} cannot run on this {device_sm} GPU; "
            f"rebuild with 'vtprune build --target {device_sm} --force'"
        )
