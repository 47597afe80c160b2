"""Frozen, validated, JSON-serialisable configs for each stage. No torch import here."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from vtprune import methods
from vtprune.errors import ConfigError

DEGREE_MODES = ("mask", "nonzero")
POSITION_MODES = ("original", "contiguous")
QUERY_SETS = ("last", "instruction")
SKIP_MODES = ("full", "kv")
BUDGET_MODES = ("constant", "flops")
SELECTOR_KINDS = ("lowrank", "exact", "paper")


def parse_keep(text: str) -> int | float:
    """Parse a ``--keep`` value: ``64`` is a token count, ``0.25`` or ``25%`` is a keep ratio."""
    raw = text.strip()
    try:
        if raw.endswith("%"):
            return float(raw[:-1]) / 100.0
        if any(c in raw for c in ".eE"):
            return float(raw)
        return int(raw)
    except ValueError:
        msg = f"--keep {text!r} is neither a token count (e.g. 64) nor a ratio (e.g. 0.25 or 25%)"
        raise ConfigError(msg) from None


@dataclass(frozen=True)
class PruneConfig:
    """How visual tokens are pruned before the language model.

    Args:
        method: ``none`` (keep everything), ``gprune`` (ALGORITHMS.md §1), a pre-LLM baseline
            ``random``, ``uniform``, ``divprune``, ``visionzip`` (§3; docs/methods.md), or an in-LLM
            method ``alvts``, ``fastv``, ``dart`` (any method registered in ``vtprune.methods``).
        keep: an ``int`` K is the total number of prunable visual tokens kept per image, split over the
            image's groups in proportion to their sizes (static shapes); a ``float`` rho in (0, 1] keeps
            ``floor(rho * N_g)`` tokens of each group g (the reference code's behaviour).
        theta: cosine threshold for graph edges.
        tau: softmax temperature of the transition matrix.
        iters: propagation steps T.
        degree: ``mask`` counts neighbours in fp32 (clean); ``nonzero`` counts ``P > 0`` in the model dtype
            (bit-faithful to the reference code under fp16).
        positions: ``original`` keeps each kept token's unpruned position id (gaps; the reference);
            ``contiguous`` renumbers the pruned sequence 0..n-1 (a variant).
        layer: in-LLM methods only. ALVTS: the first layer that selects (l0; layers below it process
            every visual token). FastV and DART: the layer from which the dropped tokens are gone. None
            means the method's default (``vtprune.methods``: 12 for ALVTS's low-rank proxy, measured best on
            the pocket VLM where its l0 = 2 collapses; 0 for the paper's selector, the paper's budget in
            every layer; 2 for FastV and DART, their papers' K).
        rank: ALVTS selector rank r of the data-free SVD factors (ignored with ``factors``).
        query: ALVTS query set: ``last`` prompt token, or every ``instruction`` token after the image.
        skip: ALVTS skipped tokens: ``full`` (they bypass the layer entirely) or ``kv`` ("KV-visible":
            they still supply keys/values from their current states).
        budget: ALVTS per-layer budget: ``constant`` (k_l = keep for every l >= layer) or ``flops`` (the
            largest constant k whose prefill MACs, selectors included, match keeping ``keep`` tokens in
            every layer).
        selector: ALVTS selector: ``lowrank`` (the RoPE-free rank-r proxy of §2.3) or ``exact`` (the
            layer's own attention rows from the query set, RoPE included, recomputed explicitly: costs a
            key projection of every visual token; the upper bound the proxy approximates) or ``paper``
            (the ALVTS paper's selector, ALGORITHMS.md §2.1b: separate rank-``rank`` factors of W_Q and
            W_K, causal attention among all rows, score = visual-to-visual x text-to-visual attention
            received; pass ``layer=0`` for the paper's budget in every layer).
        factors: ALVTS calibrated selector factors (a ``vtprune calib alvts`` output directory); None
            uses data-free SVD factors of rank ``rank``.
        seed: ``random`` only: integer in [0, 2**32) that fixes which tokens are drawn (the same seed
            keeps the same tokens on every run and in every exported graph).
    """

    method: str = "none"
    keep: int | float | None = None
    theta: float = 0.5
    tau: float = 0.03
    iters: int = 5
    degree: str = "mask"
    positions: str = "original"
    layer: int | None = None  # None: the method's default_layer (vtprune.methods)
    rank: int = 64
    query: str = "last"
    skip: str = "full"
    budget: str = "constant"
    selector: str = "lowrank"
    factors: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method != "none":
            methods.get(self.method)  # one line naming the choices for an unknown method
        self._check_keep()
        if not -1.0 <= self.theta <= 1.0:
            raise ConfigError(f"theta={self.theta} must be a cosine in [-1, 1]")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ConfigError(f"tau={self.tau} must be a positive finite temperature")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ConfigError(f"iters={self.iters!r} must be an integer >= 0")
        if self.degree not in DEGREE_MODES:
            raise ConfigError(f"degree={self.degree!r} must be one of {', '.join(DEGREE_MODES)}")
        if self.positions not in POSITION_MODES:
            raise ConfigError(f"positions={self.positions!r} must be one of {', '.join(POSITION_MODES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed={self.seed!r} must be an integer in [0, 2**32)")
        self._check_in_llm()

    def _check_in_llm(self) -> None:
        spec = methods.get(self.method) if self.method != "none" else None
        if self.layer is None:
            default = spec.default_layer if spec is not None else None
            default = default(self) if callable(default) else default
            object.__setattr__(self, "layer", 2 if default is None else default)
        for name, value, lo in (("layer", self.layer, 0), ("rank", self.rank, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"--{name} {value!r} must be an integer >= {lo}")
        if spec is not None and self.layer < spec.min_layer:
            raise ConfigError(f"--layer {self.layer}: {self.method} needs --layer >= {spec.min_layer} (it scores "
                              "tokens with the layer before)")
        for name, value, choices in (("query", self.query, QUERY_SETS), ("skip", self.skip, SKIP_MODES),
                                     ("budget", self.budget, BUDGET_MODES),
                                     ("selector", self.selector, SELECTOR_KINDS)):  # fmt: skip
            if value not in choices:
                raise ConfigError(f"--{name} {value!r} must be one of {', '.join(choices)}")

    def _check_keep(self) -> None:
        keep = self.keep
        if self.method == "none":
            if keep not in (None, 1.0):
                raise ConfigError("--keep only applies to a pruning method; method 'none' keeps every token")
            return
        if keep is None:
            raise ConfigError(f"method {self.method!r} needs a budget: --keep K (a count) or --keep 0.25 (a ratio)")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise ConfigError(f"keep={keep!r} must be an int count or a float ratio")
        if isinstance(keep, int) and keep <= 0:
            raise ConfigError(f"--keep {keep} must be a positive token count")
        if isinstance(keep, float) and not 0.0 < keep <= 1.0:
            raise ConfigError(f"--keep {keep} must be a ratio in (0, 1] or a positive integer count")

    @property
    def prunes(self) -> bool:
        return self.method != "none"

    @property
    def spec(self) -> methods.Method | None:
        """The registered method (``vtprune.methods``); None for ``none``."""
        return methods.get(self.method) if self.prunes else None

    @property
    def pre_llm(self) -> bool:
        """True when the method chooses visual tokens before the language model (pruning stage)."""
        return self.prunes and methods.get(self.method).pre_llm

    @property
    def in_encoder(self) -> bool:
        """True when the pre-LLM method reads the vision encoder and merges before the projector."""
        return self.prunes and methods.get(self.method).where == "encoder"

    @property
    def in_llm(self) -> bool:
        """True when the method chooses visual tokens inside the decoder, per layer."""
        return self.prunes and methods.get(self.method).where == "in_llm"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown PruneConfig fields: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True)
class SamplingConfig:
    """Token choice during decoding. ``temperature`` 0 is greedy (argmax); otherwise logits / temperature,
    optionally restricted to the ``top_k`` most likely tokens and the ``top_p`` nucleus, sampled with a
    generator seeded by ``seed`` (so runs repeat)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"--temperature {self.temperature} must be >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k!r} must be an integer >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p {self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
