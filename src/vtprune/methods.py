"""The pruning-method registry: everything vtprune knows about a method, in one entry.

A ``Method`` says where the method acts, how it is implemented and what it costs; every table that used
to list methods (the config's valid names, the CLI choices, the FLOPs table, the exported graph's score
ops, the benchmark sweep's variants) is derived from here. Implementations are named by import path
(``"module:attribute"``) and loaded on first use, so this module, the configs and the CLI parser stay
free of torch; a plug-in (or a test) may pass the objects themselves.

Adding a method is one module that calls ``register(Method(...))`` with its selector (pre-LLM: a
``vtprune.prune.Selector``) or its router builder (in-LLM: ``(cfg, adapter, n_text, n_visual) ->
vtprune.runtime.layerwise.Router``); see docs/development.md.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vtprune.errors import ConfigError

WHERE = ("pre", "encoder", "in_llm")


@dataclass(frozen=True)
class Method:
    """One pruning method.

    Args:
        name: the ``--method`` value.
        where: ``pre`` (chooses among the visual tokens as they enter the language model), ``encoder`` (a
            pre-LLM method that reads the vision encoder and merges before the projector; the adapter's
            ``encoder_tokens`` seam) or ``in_llm`` (chooses inside the decoder, layer by layer).
        summary: one line for ``--help`` and the docs.
        selector: pre-LLM and encoder methods: a ``vtprune.prune.Selector`` or its import path.
        stage_macs: pre-LLM and encoder methods: ``(n, d, cfg) -> int``, the MACs of choosing among one
            group of ``n`` tokens of width ``d`` (or its import path); None costs nothing.
        graph_scores: optional score function the exported graph uses instead of ``selector.scores`` (a
            custom op), same signature, or its import path.
        router: in-LLM methods: ``(cfg, adapter, n_text, n_visual) -> Router`` or its import path.
        default_layer: in-LLM methods: the ``--layer`` used when none is given, or a function of the
            config giving it (ALVTS: 0 for the paper's selector, 12 for the low-rank proxy).
        min_layer: in-LLM methods: the smallest valid ``--layer``.
        exportable: False where ``vtprune export`` cannot write the method's graphs (run it in PyTorch).
        variants: the benchmark sweep's cells: label -> PruneConfig fields besides method and budget.
    """

    name: str
    where: str
    summary: str
    selector: Any = None
    stage_macs: Any = None
    graph_scores: Any = None
    router: Any = None
    default_layer: int | Callable[[Any], int] | None = None
    min_layer: int = 0
    exportable: bool = True
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.where not in WHERE:
            raise ValueError(f"method {self.name!r}: where={self.where!r} must be one of {', '.join(WHERE)}")
        needs = "router" if self.where == "in_llm" else "selector"
        if getattr(self, needs) is None:
            raise ValueError(f"method {self.name!r} acts {self.where} and needs a {needs}")
        if not self.variants:
            object.__setattr__(self, "variants", {self.name: {}})

    @property
    def pre_llm(self) -> bool:
        return self.where in ("pre", "encoder")

    def load(self, part: str) -> Any:
        """The implementation behind ``part`` (``selector``, ``stage_macs``, ``graph_scores``, ``router``),
        imported on first use; None where the method has none."""
        ref = getattr(self, part)
        if not isinstance(ref, str):
            return ref
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, Method] = {}


def register(method: Method, replace: bool = False) -> Method:
    """Add ``method`` (``replace``: in place of a registered one of the same name)."""
    if method.name == "none":
        raise ValueError("'none' means no pruning and is not a method name")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


@contextlib.contextmanager
def registered(method: Method) -> Iterator[Method]:
    """``method`` registered for the duration of a block (tests, experiments), then the registry as before."""
    before = _REGISTRY.get(method.name)
    register(method, replace=True)
    try:
        yield method
    finally:
        if before is None:
            del _REGISTRY[method.name]
        else:
            _REGISTRY[method.name] = before


def get(name: str) -> Method:
    """The registered method ``name``, or one line listing the choices."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown pruning method {name!r}; choose one of {', '.join(names(with_none=True))}")
    return _REGISTRY[name]


def names(where: str | tuple[str, ...] | None = None, with_none: bool = False) -> tuple[str, ...]:
    """Registered method names in registration order, optionally only those acting ``where``."""
    wanted = (where,) if isinstance(where, str) else where
    found = tuple(n for n, m in _REGISTRY.items() if wanted is None or m.where in wanted)
    return ("none", *found) if with_none else found


def all_methods() -> tuple[Method, ...]:
    return tuple(_REGISTRY.values())


# --- the built-in methods (docs/methods.md) ---------------------------------------------------------
register(Method(
    "gprune", "pre", "G-Prune: graph propagation of information, keep the top-k (ALGORITHMS.md §1)",
    selector="vtprune.prune:GPRUNE", stage_macs="vtprune.flops:gprune_group_macs",
    graph_scores="vtprune.export.vision:gprune_graph_scores",
    variants={"gprune": {}, "gprune-theta=0.7": {"theta": 0.7}},  # theta 0.5 is the default
))  # fmt: skip
register(Method("random", "pre", "random tokens, fixed by --prune-seed (baseline)", selector="vtprune.prune:RANDOM"))
register(Method("uniform", "pre", "spatially strided tokens (baseline)", selector="vtprune.prune:UNIFORM"))
register(Method(
    "pool", "pre", "average pooling of the visual-token grid to the budget (downsampling baseline)",
    selector="vtprune.prune:POOL", stage_macs="vtprune.flops:pool_group_macs",
))  # fmt: skip
register(Method(
    "divprune", "pre", "DivPrune: greedy max-min diversity (baseline)",
    selector="vtprune.prune:DIVPRUNE", stage_macs="vtprune.flops:divprune_group_macs",
))  # fmt: skip
register(Method(
    "visionzip", "encoder", "VisionZip: dominant tokens by [CLS] attention plus merged contextual tokens",
    selector="vtprune.prune:VISIONZIP", stage_macs="vtprune.flops:visionzip_macs",
))  # fmt: skip
# ALVTS's low-rank proxy starts at l0 = 12: the earliest start that keeps >= 96.7% of the pocket VLM's
# unpruned easy-vqa accuracy at k = 28 (benchmarks/results/pocket/alvts/target); its l0 = 2 keeps 33-47%.
# The paper's selector has a budget in every layer (l0 = 0), as the paper does.
register(Method(
    "alvts", "in_llm", "ALVTS: per-layer selection by a low-rank attention proxy (ALGORITHMS.md §2)",
    router="vtprune.runtime.layerwise:alvts_router",
    default_layer=lambda cfg: 0 if cfg.selector == "paper" else 12,
    variants={"alvts": {}, "alvts-l0=10": {"layer": 10}, "alvts-l0=2": {"layer": 2},
              "alvts-exact-l0=2": {"selector": "exact", "layer": 2}},
))  # fmt: skip
register(Method(
    "fastv", "in_llm", "FastV: drop the visual tokens the last prompt token attends least at layer K",
    router="vtprune.runtime.layerwise:fastv_router", default_layer=2, min_layer=1,
))  # fmt: skip
register(Method(
    "dart", "in_llm", "DART: keep pivots and the tokens least similar to them from layer K",
    router="vtprune.runtime.layerwise:dart_router", default_layer=2, min_layer=1,
))  # fmt: skip
