"""Build a serialized TensorRT engine from an ONNX file.

Works with full TensorRT (JetPack on Jetson, NVIDIA's index on desktops) and with TensorRT for RTX, which
installs from PyPI and compiles ahead of time on a machine with no GPU (PLATFORM.md §2b). Both are imported
lazily, only when a function here is called.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from vtprune import outputs
from vtprune.errors import BackendUnavailableError, ConfigError, EngineBuildError, OnnxParseError

_LOG = logging.getLogger("vtprune.trt")

FLAVOURS = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt-rtx"}  # module name -> flavour
PRECISIONS = ("fp32", "fp16", "bf16", "typed")
INSTALL_HINT = "pip install 'vtprune[trt]'"

Shape = Sequence[int]
Progress = Callable[[str], None]
PROGRESS_EVERY_S = 10.0  # at most one step-count line per phase this often
Profiles = Mapping[str, tuple[Shape, Shape, Shape]]

# Targets TensorRT-RTX does not compile for, and what to use instead.
_NOT_RTX = {
    "sm72": "Jetson Xavier",
    "sm87": "Jetson Orin",
    "sm90": "Hopper",
    "sm100": "datacenter Blackwell",
    "sm110": "Jetson Thor",
}

# Substrings of parser errors -> the usual cause. onnxscript writes `for i in range(n)` as Loop(n, "", ...),
# and the TensorRT parser does not register the body's `cond_in` when the Loop's cond input is empty.
_PARSE_HINTS = (
    (
        "Plugin not found",
        "no TensorRT importer, model-local function or plugin has that name: add a function body "
        "made of standard ops, or load a plugin",
    ),
    (
        "Node input was not registered",
        "if this node is in a Loop body, give the Loop a constant true cond input "
        "(an empty cond is not supported) or unroll the loop",
    ),
)
_PARSE_DEFAULT = "replace these nodes with standard ONNX ops, give them a model-local function body, or load a plugin"

# Substrings of builder errors -> the advice that fixes them.
_BUILD_HINTS = (
    ("K exceeds the maximum", "TopK's K is above TensorRT's limit (3840): lower the token budget."),
    ("FP32 GEMM is not supported", "Turing (sm75) has no FP32 GEMM: export the model in fp16, use precision='typed'."),
    ("generateForCurrent", "no GPU here: pass target='sm89' (or another sm), or target=None for a portable engine."),
    ("workspace limit", "the workspace is too small: raise workspace_mb or leave it unset."),
    ("missing values for shape input", "a shape-tensor input needs values, not shapes: make it a constant."),
)


@dataclass(frozen=True)
class ParserIssue:
    """One error reported by the TensorRT ONNX parser."""

    node_index: int
    node_name: str
    op_type: str
    description: str
    function_stack: tuple[str, ...] = ()

    def line(self) -> str:
        """One line naming the node, its op type and what went wrong."""
        where = f"node {self.node_name or '#' + str(self.node_index)!r} ({self.op_type or '?'})"
        inside = f" [inside function {' > '.join(self.function_stack)}]" if self.function_stack else ""
        return f"  {where}{inside}: {self.description}"


@dataclass(frozen=True)
class BuildResult:
    """A serialized engine and the settings it was built with.

    Attributes:
        flavour: ``"tensorrt"`` or ``"tensorrt-rtx"``.
        trt_version: version string of the TensorRT module that built the engine.
        target: compute capabilities compiled for (``"sm89"``, ``"sm86,sm89"``), ``"native"`` for the GPU
            present, or ``None`` for the builder's default (TensorRT-RTX: portable across sm80 and later;
            full TensorRT: the GPU present).
        precision: one of ``PRECISIONS``.
        engine_size: size of the serialized engine in bytes.
        build_seconds: wall time of ``build_serialized_network``.
        num_layers: layers of the parsed network (before the builder fuses them).
        onnx_path: the ONNX file the engine was built from.
        profiles: the optimization profile used, ``{input: (min, opt, max)}``.
        timing_cache: ``None``, or the timing cache file used: ``path``, ``sha256_before`` (``None`` when it
            was created by this build), ``sha256_after`` and ``used_by_builder`` (``False`` for TensorRT-RTX,
            whose timing cache calls are no-ops since 1.2: the file is still validated and written).
        engine: the serialized engine (write it with ``write``).
        plugins: the plugin layers in the engine (``[]`` when built from the function bodies); loading it
            needs ``vtprune.export.ops.trt_plugins.load_plugins`` first.
    """

    flavour: str
    trt_version: str
    target: str | None
    precision: str
    engine_size: int
    build_seconds: float
    num_layers: int
    onnx_path: str
    profiles: dict[str, tuple[tuple[int, ...], ...]]
    engine: bytes = field(repr=False)
    timing_cache: dict[str, Any] | None = None
    plugins: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the engine bytes, for a JSON sidecar."""
        info = asdict(self)
        del info["engine"]
        return info

    def write(self, path: str | Path) -> Path:
        """Write the engine to ``path`` and its settings to ``path`` + ``.json``; returns ``path``."""
        path = Path(path)
        path.write_bytes(self.engine)
        path.with_name(path.name + ".json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def import_tensorrt() -> tuple[ModuleType, str]:
    """Import full TensorRT, or else TensorRT for RTX.

    Returns:
        ``(module, flavour)`` with flavour ``"tensorrt"`` or ``"tensorrt-rtx"``.

    Raises:
        BackendUnavailableError: neither module imports; the message names the extra to install.
    """
    reasons = []
    for name, flavour in FLAVOURS.items():
        try:
            return importlib.import_module(name), flavour
        except (ImportError, OSError) as exc:  # OSError: a wheel whose shared libraries fail to load
            reasons.append(f"{name}: {exc}")
    raise BackendUnavailableError(
        f"TensorRT is not installed: {INSTALL_HINT} (TensorRT for RTX, from PyPI), or use the TensorRT "
        f"that ships with JetPack. Import errors: {'; '.join(reasons)}"
    )


def build_engine(
    onnx_path: str | Path,
    profiles: Profiles | None = None,
    precision: str = "fp32",
    target: str | None = None,
    workspace_mb: int | None = None,
    timing_cache: str | Path | None = None,
    progress: Progress | None = None,
    plugins: bool = False,
) -> BuildResult:
    """Parse an ONNX file with the TensorRT ONNX parser and build a serialized engine.

    Args:
        onnx_path: the ONNX file; external data next to it is found by the parser.
        profiles: ``{input_name: (min_shape, opt_shape, max_shape)}`` for every input with a dynamic dim.
            Static inputs need no entry. ``None`` is fine only when no input is dynamic.
        precision: ``"fp32"``; ``"fp16"`` or ``"bf16"`` (full TensorRT only: builder flags that let layers
            run in lower precision); or ``"typed"`` (strongly typed: each layer keeps the ONNX tensor type).
            TensorRT-RTX is always strongly typed, so there an fp16 engine comes from an fp16 ONNX.
        target: TensorRT-RTX compute capabilities, e.g. ``"sm89"`` or ``"sm86,sm120"``; ``"native"`` for the
            GPU present; ``None`` for the builder's default. Full TensorRT only builds for the GPU present.
        workspace_mb: builder workspace limit in MiB; ``None`` keeps TensorRT's default.
        timing_cache: a timing cache file: loaded when it exists (an empty cache otherwise), attached to the
            builder, and after a successful build rewritten atomically with the tactics timed. The cache is
            attached with ``ignore_mismatch=False``: timings from another GPU or TensorRT version would pick
            tactics for the wrong device, so such a file is refused (delete it to start a new one).
        plugins: map ``vtprune::GraphPropagate`` / ``TopKRoute`` nodes to the fused plugins of
            ``vtprune.export.ops.trt_plugins`` (registered here, explicitly) instead of importing their
            model-local function bodies; needs a TensorRT with IPluginV3 layers (not TensorRT-RTX 1.7).
        progress: called with one line per top-level build phase and its direct sub-phases (with step
            counts), and a step count at most every ``PROGRESS_EVERY_S`` seconds; only when the installed
            TensorRT has ``IProgressMonitor``. A ``KeyboardInterrupt`` (Ctrl-C, or raised by ``progress``)
            cancels the build: TensorRT stops at its next step and the interrupt propagates.

    Returns:
        A ``BuildResult`` holding the serialized engine and the build settings.

    Raises:
        BackendUnavailableError: no TensorRT module imports.
        ConfigError: a bad precision, target, workspace or profile, a dynamic input without a profile, or a
            timing cache file that cannot be read or does not deserialize.
        OnnxParseError: the parser rejected nodes; the message lists each one.
        EngineBuildError: the builder failed; the message carries TensorRT's errors.
    """
    trt, flavour = import_tensorrt()
    path = Path(onnx_path)
    _check_options(flavour, precision, workspace_mb)
    capabilities = resolve_target(trt, flavour, target)
    if plugins:
        require_plugins(trt, flavour)
    logger = _capturing_logger(trt)
    builder = trt.Builder(logger)
    network, parser = _parse_onnx(trt, builder, logger, path, precision, plugins)  # parser owns the weights
    shapes = _profile_shapes(network, profiles)
    config = _builder_config(trt, builder, precision, capabilities, workspace_mb, shapes)
    cache = _TimingCache.attach(config, logger, Path(timing_cache)) if timing_cache is not None else None
    monitor = _attach_progress(trt, config, progress)  # referenced until the build returns
    engine, seconds = _build(builder, network, config, logger, path, monitor)
    return BuildResult(
        flavour=flavour,
        trt_version=trt.__version__,
        target=None if target is None else ",".join(_target_names(capabilities)) or "native",
        precision=precision,
        engine_size=len(engine),
        build_seconds=seconds,
        num_layers=network.num_layers,
        onnx_path=str(path),
        profiles=shapes,
        engine=engine,
        timing_cache=cache.save() if cache is not None else None,
        plugins=_plugin_layers(trt, network) if plugins else [],
    )


def resolve_target(trt: ModuleType, flavour: str, target: str | None) -> list[Any]:
    """Map a target string to TensorRT-RTX ``ComputeCapability`` members.

    Args:
        trt: the imported TensorRT module.
        flavour: ``"tensorrt"`` or ``"tensorrt-rtx"``.
        target: ``None``, ``"native"``, or comma-separated ``smXY`` names (``"sm89"``, ``"sm_86,sm120"``).

    Returns:
        The enum members to set on the builder config; empty for the builder's default.

    Raises:
        ConfigError: a target the installed TensorRT cannot compile for, with the reason.
    """
    if target is None or (flavour == "tensorrt" and target.strip().lower() == "native"):
        return []
    if flavour == "tensorrt":
        raise ConfigError(
            f"target={target!r}: full TensorRT builds only for the GPU it runs on; build on the target device "
            "with target=None, or compile ahead of time with TensorRT for RTX (RTX GPUs only)"
        )
    offered = {name.lower(): cap for name, cap in trt.ComputeCapability.__members__.items() if name.startswith("SM")}
    offered["native"] = trt.ComputeCapability.CURRENT
    return [_one_target(name, offered, trt.__version__) for name in _split_targets(target)]


def _split_targets(target: str) -> list[str]:
    names = [re.sub(r"^sm_", "sm", part.strip().lower()) for part in target.split(",") if part.strip()]
    if not names:
        raise ConfigError(f"target={target!r} names no compute capability; use e.g. 'sm89'")
    return names


def _one_target(name: str, offered: dict[str, Any], version: str) -> Any:
    if name in offered:
        return offered[name]
    choices = ", ".join(sorted(offered, key=lambda n: (n == "native", int(n[2:]) if n != "native" else 0)))
    why = f"{name} ({_NOT_RTX[name]}) is not an RTX GPU; build there with full TensorRT. " if name in _NOT_RTX else ""
    raise ConfigError(f"target {name!r} is not offered by TensorRT-RTX {version}. {why}Choose from: {choices}")


def _target_names(capabilities: list[Any]) -> list[str]:
    return [cap.name.lower() if cap.name.startswith("SM") else "native" for cap in capabilities]


def _check_options(flavour: str, precision: str, workspace_mb: int | None) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if flavour == "tensorrt-rtx" and precision in ("fp16", "bf16"):
        raise ConfigError(
            f"precision={precision!r}: TensorRT-RTX builds strongly typed networks only, so layer precision "
            f"follows the ONNX tensor types. Export the model in {precision} and build with precision='typed'"
        )
    if workspace_mb is not None and workspace_mb <= 0:
        raise ConfigError(f"workspace_mb={workspace_mb} must be a positive number of MiB")


@functools.cache
def _capturing_logger(trt: ModuleType) -> Any:
    """One logger per TensorRT module: TensorRT keeps the first logger it is given for the whole process."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
                _LOG.error("%s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(msg)
                _LOG.warning("%s", msg)
            else:
                _LOG.debug("%s", msg)

    return CapturingLogger()


def _parse_onnx(
    trt: ModuleType, builder: Any, logger: Any, path: Path, precision: str, plugins: bool = False
) -> tuple[Any, Any]:
    if not path.is_file():
        raise EngineBuildError(f"ONNX file not found: {path}")
    typed = precision == "typed" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse(onnx_without_functions(path), str(path)) if plugins else parser.parse_from_file(str(path))
    if not parsed:
        raise _parse_error(parser, path)
    return network, parser


def onnx_without_functions(path: Path) -> bytes:
    """The model at ``path`` with the vtprune function bodies removed (external data left where it is), so
    the parser maps those nodes to registered plugins: it prefers a model-local function when one exists."""
    import onnx

    from vtprune.export.ops import DOMAIN
    from vtprune.export.ops.trt_plugins import PLUGIN_OPS

    model = onnx.load(str(path), load_external_data=False)
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name in PLUGIN_OPS)]
    del model.functions[:]
    model.functions.extend(keep)
    return model.SerializeToString()


def require_plugins(trt: ModuleType, flavour: str) -> None:
    """Register the fused vtprune plugins with ``trt``, or refuse: no plugin layers, or no Triton."""
    from vtprune.export.ops import trt_plugins

    if not trt_plugins.supports_plugins(trt):
        raise ConfigError(
            f"--plugins: {flavour} {trt.__version__} cannot add plugin layers; build without --plugins (the pruning "
            "ops then compile from their ONNX function bodies), or with full TensorRT (JetPack, NVIDIA's wheels)"
        )
    try:
        import triton  # noqa: F401  (the plugins' kernels; checked here rather than at the first enqueue)
    except ImportError:
        raise ConfigError("--plugins: the fused plugins run Triton kernels: pip install 'vtprune[gpu]'") from None
    trt_plugins.load_plugins(trt)


def _plugin_layers(trt: ModuleType, network: Any) -> list[str]:
    """Names of the plugin layers in ``network``; an error if a vtprune op was not mapped to its plugin."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    found = [layer.name for layer in layers if layer.type == trt.LayerType.PLUGIN_V3]
    if not found:
        raise EngineBuildError("--plugins: the parsed network has no plugin layer; the ONNX has no vtprune op")
    return found


def _parse_error(parser: Any, path: Path) -> OnnxParseError:
    issues = [_issue(parser.get_error(i)) for i in range(parser.num_errors)]
    ops = ", ".join(sorted({issue.op_type for issue in issues if issue.op_type})) or "?"
    hints = (hint for issue in issues for needle, hint in _PARSE_HINTS if needle in issue.description)
    head = f"TensorRT cannot parse {path.name}: {len(issues)} node error(s) in {ops}; {next(hints, _PARSE_DEFAULT)}"
    return OnnxParseError("\n".join([head, *(issue.line() for issue in issues)]), issues)


def _issue(error: Any) -> ParserIssue:
    stack = tuple(error.local_function_stack()) if hasattr(error, "local_function_stack") else ()
    return ParserIssue(
        node_index=error.node(),
        node_name=error.node_name(),
        op_type=error.node_operator(),
        description=error.desc(),
        function_stack=stack,
    )


def _profile_shapes(network: Any, profiles: Profiles | None) -> dict[str, tuple[tuple[int, ...], ...]]:
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    given = dict(profiles or {})
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise ConfigError(f"profiles name unknown inputs {unknown}; the network's inputs are {sorted(inputs)}")
    _reject_shape_tensors(inputs)
    missing = [f"{name} {tuple(t.shape)}" for name, t in inputs.items() if -1 in tuple(t.shape) and name not in given]
    if missing:
        raise ConfigError(
            f"dynamic inputs need an optimization profile: {', '.join(missing)}. Pass "
            "profiles={name: (min_shape, opt_shape, max_shape)} with -1 dims replaced by sizes"
        )
    return {name: _checked_profile(name, tuple(inputs[name].shape), shapes) for name, shapes in given.items()}


def _reject_shape_tensors(inputs: dict[str, Any]) -> None:
    shape_inputs = sorted(name for name, tensor in inputs.items() if tensor.is_shape_tensor)
    if shape_inputs:
        raise ConfigError(
            f"inputs {shape_inputs} are shape tensors (their values set output shapes, e.g. a runtime TopK K); "
            "vtprune builds need them as constants in the graph"
        )


def _checked_profile(name: str, declared: tuple[int, ...], shapes: Sequence[Shape]) -> tuple[tuple[int, ...], ...]:
    if len(shapes) != 3:
        raise ConfigError(f"profile for {name!r} must be (min, opt, max) shapes, got {len(shapes)} shape(s)")
    lo, opt, hi = (tuple(int(d) for d in shape) for shape in shapes)
    for label, shape in (("min", lo), ("opt", opt), ("max", hi)):
        fits = len(shape) == len(declared) and all(d == s or d == -1 for d, s in zip(declared, shape, strict=True))
        if not fits or min(shape, default=1) < 0:
            raise ConfigError(f"profile {label} shape {shape} for {name!r} does not fit its shape {declared}")
    if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
        raise ConfigError(f"profile for {name!r} needs min <= opt <= max in every dim, got {lo}, {opt}, {hi}")
    return lo, opt, hi


def _builder_config(
    trt: ModuleType,
    builder: Any,
    precision: str,
    capabilities: list[Any],
    workspace_mb: int | None,
    shapes: dict[str, tuple[tuple[int, ...], ...]],
) -> Any:
    config = builder.create_builder_config()
    if precision in ("fp16", "bf16"):
        config.set_flag(getattr(trt.BuilderFlag, precision.upper()))
    if capabilities:
        config.num_compute_capabilities = len(capabilities)
        for index, capability in enumerate(capabilities):
            config.set_compute_capability(capability, index)
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    return config


def _build(builder: Any, network: Any, config: Any, logger: Any, path: Path, monitor: Any) -> tuple[bytes, float]:
    logger.errors.clear()
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if monitor is not None and monitor.cancelled:
        raise KeyboardInterrupt  # TensorRT stopped at the monitor's request; nothing was returned
    if serialized is None:
        raise _build_error(logger.errors, path)
    return bytes(serialized), seconds


def _build_error(errors: list[str], path: Path) -> EngineBuildError:
    hints = [hint for needle, hint in _BUILD_HINTS if any(needle in error for error in errors)]
    first = hints[0] if hints else "see TensorRT's errors below"
    lines = [f"TensorRT could not build an engine from {path.name}: {first}", *hints[1:]]
    return EngineBuildError("\n".join(lines + [f"  {error}" for error in errors or ["(no error was logged)"]]))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class _TimingCache:
    """A timing cache file attached to a builder config; ``save`` writes it back after the build.

    TensorRT-RTX (1.2 and later) accepts timing cache calls but ignores them, and without a GPU it cannot
    deserialize any cache (it checks the device first). There the file is checked against the format of a
    cache this TensorRT writes, and kept as it is (``keep``), so a cache shared with a GPU build is not lost.
    """

    path: Path
    cache: Any
    sha256_before: str | None
    used_by_builder: bool
    keep: bytes = b""

    @classmethod
    def attach(cls, config: Any, logger: Any, path: Path) -> _TimingCache:
        delete = "delete it (a new one is written by the next build) or pass another --timing-cache file"
        try:
            data = path.read_bytes() if path.exists() else b""
        except OSError as exc:
            raise ConfigError(f"timing cache {path} cannot be read ({exc.strerror or exc}): {delete}") from None
        logger.warnings.clear()
        with warnings.catch_warnings(record=True) as caught:  # TensorRT-RTX: "timing cache operations are no-ops"
            warnings.simplefilter("always")
            cache = config.create_timing_cache(data)
            attached = cache is not None and config.set_timing_cache(cache, False)
            no_op = any("no-op" in str(w.message) for w in caught)
            corrupt = any("deserialize timing cache" in msg for msg in logger.warnings)
            if no_op:  # the builder ignores it: check the format only (the magic of an empty cache)
                corrupt = data[:8] != bytes(config.create_timing_cache(b"").serialize())[:8]
        if not attached or (data and corrupt):
            raise ConfigError(f"timing cache {path} is corrupt or was written for another GPU or TensorRT: {delete}")
        return cls(path, cache, _sha256(data) if data else None, not no_op, data if no_op else b"")

    def save(self) -> dict[str, Any]:
        """Write the serialized cache next to ``path`` and rename it over ``path``; returns the metadata."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            data = self.keep or bytes(self.cache.serialize())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        outputs.write_file_atomic(self.path, data)
        return {"path": str(self.path), "sha256_before": self.sha256_before, "sha256_after": _sha256(data),
                "used_by_builder": self.used_by_builder}  # fmt: skip


def _attach_progress(trt: ModuleType, config: Any, progress: Progress | None) -> Any:
    if progress is None or not hasattr(trt, "IProgressMonitor") or not hasattr(config, "progress_monitor"):
        return None
    monitor = _progress_monitor_class(trt)(progress)
    config.progress_monitor = monitor
    return monitor


@functools.cache
def _progress_monitor_class(trt: ModuleType) -> type:
    """An ``IProgressMonitor`` reporting phases at depth 0 and 1 to a callback, and cancelling on Ctrl-C.

    TensorRT calls back into Python during the build, so a ``KeyboardInterrupt`` may surface inside a callback;
    raising it through TensorRT's C++ would abort the process, so the monitor records it and asks TensorRT to
    stop (``step_complete`` returns ``False``); ``_build`` then re-raises it.
    """

    class ProgressMonitor(trt.IProgressMonitor):
        def __init__(self, report: Progress) -> None:
            trt.IProgressMonitor.__init__(self)
            self.report = report
            self.cancelled = False
            self.phases: dict[str, tuple[int, int, float]] = {}  # name -> (depth, steps, start time)
            self.last = 0.0

        def _say(self, line: str) -> None:
            try:
                self.report(line)
                self.last = time.perf_counter()
            except KeyboardInterrupt:
                self.cancelled = True

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            depth = self.phases[parent_phase][0] + 1 if parent_phase in self.phases else 0
            self.phases[phase_name] = (depth, num_steps, time.perf_counter())
            if depth <= 1:
                self._say(f"{'  ' * depth}{phase_name} ({num_steps} step{'s' * (num_steps != 1)})")

        def step_complete(self, phase_name: str, step: int) -> bool:
            depth, steps, _ = self.phases.get(phase_name, (0, 0, 0.0))
            if depth <= 1 and time.perf_counter() - self.last >= PROGRESS_EVERY_S:
                self._say(f"{'  ' * depth}{phase_name}: step {step + 1}/{steps}")
            return not self.cancelled

        def phase_finish(self, phase_name: str) -> None:
            depth, _, start = self.phases.pop(phase_name, (1, 0, 0.0))
            if depth == 0 and not self.cancelled:
                self._say(f"{phase_name}: done in {time.perf_counter() - start:.1f} s")

    return ProgressMonitor
