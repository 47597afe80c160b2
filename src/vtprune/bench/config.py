"""Frozen, validated configs of ``vtprune bench``, ``compare`` and ``predict``; one field per CLI flag.

No torch or onnxruntime import here. Paths stay ``Path`` objects; ``to_dict`` makes them JSON-ready.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtprune import methods
from vtprune.config import PruneConfig, parse_keep
from vtprune.errors import ConfigError

BACKENDS = ("ort", "torch", "trt")
PROVIDERS = ("cpu", "cuda", "tensorrt")
DATASETS = ("easy-vqa",)
DTYPES = ("fp32", "fp16", "bf16")
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_PROMPT = "what shape is in the image ?"


@dataclass(frozen=True)
class Budget:
    """One visual-token budget: ``None`` keeps every token (method ``none``), an int K is a kept count,
    a float in (0, 1] a kept ratio (exported bundles turn it into a count)."""

    keep: int | float | None = None

    def __post_init__(self) -> None:
        PruneConfig(method="gprune" if self.keep is not None else "none", keep=self.keep)  # validates keep

    @classmethod
    def parse(cls, text: str) -> Budget:
        raw = str(text).strip().lower()
        return cls(None) if raw in ("all", "none", "full") else cls(parse_keep(raw))

    @property
    def label(self) -> str:
        """``all``, ``64`` or ``25%``: how budgets are named in reports and tables."""
        if self.keep is None:
            return "all"
        return str(self.keep) if isinstance(self.keep, int) else f"{self.keep * 100:g}%"

    @property
    def key(self) -> str:
        """A file-name-safe key (``all``, ``k64``, ``r0.25``): names the bundle exported for this budget."""
        if self.keep is None:
            return "all"
        return f"k{self.keep}" if isinstance(self.keep, int) else f"r{self.keep:g}"

    def prune_config(self, method: str = "gprune", base: PruneConfig | None = None) -> PruneConfig:
        """This budget applied to ``method``, with G-Prune's other settings taken from ``base``."""
        base = base or PruneConfig()
        if self.keep is None:
            return dataclasses.replace(base, method="none", keep=None)
        return dataclasses.replace(base, method=method, keep=self.keep)


def parse_budgets(text: str) -> tuple[Budget, ...]:
    """``all,256,128,0.25`` -> budgets, in the order given, duplicates refused."""
    budgets = tuple(Budget.parse(part) for part in str(text).split(",") if part.strip())
    if not budgets:
        raise ConfigError(f"--budgets {text!r} names no budget; e.g. --budgets all,64,32")
    labels = [b.label for b in budgets]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--budgets {text!r} repeats a budget")
    return budgets


def _check_positive(name: str, value: Any, minimum: int = 1, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"--{name} {value!r} must be an integer >= {minimum}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...], optional: bool = False) -> None:
    if optional and value is None:
        return
    if value not in choices:
        raise ConfigError(f"--{name} {value!r} must be one of {', '.join(choices)}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Budget):
        return value.keep if value.keep is not None else "all"
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class BenchConfig(_Serializable):
    """``vtprune bench``: what runs (bundles or a model at several budgets), on what inputs, how often.

    ONNX Runtime (``backend="ort"``): give bundles (one budget each), or one bundle plus ``budgets``
    (its source model is re-exported per budget with the bundle's G-Prune settings), or ``model`` plus
    ``budgets``. Exports go to ``work_dir/<model>/<method>-<budget>`` and are reused when present.
    PyTorch (``backend="torch"``): ``model`` plus ``budgets`` on ``device``; nothing is exported.
    TensorRT (``backend="trt"``): bundles whose engines ``vtprune build`` made, on the GPU.
    """

    bundles: tuple[Path, ...] = ()
    backend: str = "ort"
    model: str | None = None
    budgets: tuple[Budget, ...] = ()
    method: str = "gprune"
    provider: str = "cpu"
    threads: int | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    images: Path | None = None
    dataset: str | None = None
    num_images: int = 4
    prompt: str = DEFAULT_PROMPT
    new_tokens: int = 16
    warmup: int = 2
    iters: int = 10
    work_dir: Path | None = None
    cache_dir: Path | None = None
    no_validate: bool = False
    out: Path = Path("bench-report")
    force: bool = False
    no_progress: bool = False
    notes: tuple[str, ...] = ()
    background_load: int = 0
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("provider", self.provider, PROVIDERS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("dataset", self.dataset, DATASETS, optional=True)
        if self.method not in methods.names():
            pruning = methods.names()
            raise ConfigError(f"--method {self.method!r} must be a pruning method: {', '.join(pruning)}")
        for name in ("num_images", "new_tokens", "iters"):
            _check_positive(name.replace("_", "-"), getattr(self, name))
        _check_positive("warmup", self.warmup, minimum=0)
        _check_positive("threads", self.threads, optional=True)
        _check_positive("background-load", self.background_load, minimum=0)
        if self.background_load > 4 * (os.cpu_count() or 1):
            raise ConfigError(f"--background-load {self.background_load}: at most 4 busy processes per core "
                              f"({4 * (os.cpu_count() or 1)} here)")  # fmt: skip
        if self.images is not None and self.dataset is not None:
            raise ConfigError("give --images DIR or --dataset, not both")
        self._check_subject()

    def _check_subject(self) -> None:
        if self.backend == "torch":
            if self.bundles:
                raise ConfigError("--backend torch runs a checkpoint (--model), not bundles; drop the bundle paths")
            if self.provider != "cpu":
                raise ConfigError(f"--provider {self.provider} applies to --backend ort; PyTorch takes --device")
        elif self.dtype != "fp32":
            raise ConfigError(f"--dtype {self.dtype} applies to --backend torch; a bundle's precision is fixed")
        elif self.device != "cpu":
            raise ConfigError(f"--device {self.device} applies to --backend torch; ONNX Runtime takes --provider")
        if self.backend == "trt" and (not self.bundles or self.budgets or self.provider != "cpu" or self.threads):
            raise ConfigError("--backend trt runs built bundles (vtprune build) as given: pass bundle paths, "
                              "without --model, --budgets, --provider or --threads")  # fmt: skip
        if self.bundles and self.model is not None:
            raise ConfigError("give bundle paths or --model, not both")
        if not self.bundles and self.model is None:
            raise ConfigError("nothing to benchmark: give bundle paths (--backend ort) or --model M --budgets ...")
        if self.model is not None and not self.budgets:
            raise ConfigError("--model needs --budgets, e.g. --budgets all,64,32")
        if len(self.bundles) > 1 and self.budgets:
            raise ConfigError("--budgets re-exports one bundle's model; with several bundles each is its own budget")


@dataclass(frozen=True)
class CompareConfig(_Serializable):
    """``vtprune compare``: two or more reports side by side; the first is the baseline of every ratio."""

    reports: tuple[Path, ...] = ()
    out: Path = Path("compare-report")
    labels: tuple[str, ...] = ()
    force: bool = False

    def __post_init__(self) -> None:
        if len(self.reports) < 2:
            raise ConfigError(f"compare needs at least two reports, got {len(self.reports)}")
        if self.labels and len(self.labels) != len(self.reports):
            raise ConfigError(f"--labels has {len(self.labels)} names for {len(self.reports)} reports")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"--labels {','.join(self.labels)} repeats a name")


@dataclass(frozen=True)
class PredictConfig(_Serializable):
    """``vtprune predict``: roofline latency of bundles on a device from the device-peaks table.

    ``budgets`` other than the bundles' own are predicted by substituting the kept-token count (the
    vision graph is unchanged). ``prompt``/``new_tokens``/``image`` default to the calibration report's
    workload when ``calibrate`` is given, else to ``bench``'s defaults.
    """

    bundles: tuple[Path, ...] = ()
    device: str = "cpu-host"
    precision: str | None = None
    budgets: tuple[Budget, ...] = ()
    calibrate: Path | None = None
    prompt: str | None = None
    new_tokens: int | None = None
    image: Path | None = None
    threads: int | None = None
    out: Path = Path("predict-report")
    force: bool = False

    def __post_init__(self) -> None:
        from vtprune.bench.devices import DEVICES

        if not self.bundles:
            raise ConfigError("predict needs at least one bundle directory")
        _check_choice("device", self.device, tuple(DEVICES))
        _check_choice("precision", self.precision, PRECISIONS, optional=True)
        _check_positive("new-tokens", self.new_tokens, optional=True)
        _check_positive("threads", self.threads, optional=True)
        if len(self.bundles) > 1 and self.budgets:
            raise ConfigError("--budgets substitutes kept-token counts into one bundle; give one bundle")
