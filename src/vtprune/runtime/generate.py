"""The one generation loop, over the runner contract every backend implements.

A runner (PyTorch ``PrunedVlm``, ONNX Runtime ``OrtVlm``, TensorRT ``TrtVlm``) supplies only its own
calls: ``inputs`` (processor), ``prefill_inputs`` (vision, pruning, embedding and merge: a backend prefill
record), ``next_position`` (of the first decoded token), ``facts`` (token counts, after decoding:
in-LLM methods know their kept tokens only then), ``first_logits`` (the prompt
through the decoder) and ``next_logits`` (one token through it), plus ``flops``/``layer_costs``. The
steps below (gpt-fast's ``prefill`` / ``decode_one_token`` / ``decode_n_tokens``) and ``generate`` are
written once, so every backend decodes, stops and reports the same way.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from vtprune.config import PruneConfig, SamplingConfig
from vtprune.flops import FlopsReport
from vtprune.runtime.report import peak_rss_mb
from vtprune.runtime.sampling import TokenChooser, new_token_room
from vtprune.runtime.timing import StageTimer


@dataclass(frozen=True)
class PromptFacts:
    """What the loop and the report need from a backend's prefill record."""

    visual_total: int  # visual tokens the image gave
    visual_kept: int  # after the pruning stage, or the fewest any decoder layer processed (in-LLM)
    prompt_len: int  # the unpruned prompt
    prefill_tokens: int  # rows entering the decoder
    cached_tokens: int = 0  # of those, rows whose keys and values came from the prefix cache


class Runner(Protocol):
    adapter: Any
    cfg: PruneConfig
    sampling: SamplingConfig

    def timer(self) -> StageTimer: ...

    def scope(self) -> contextlib.AbstractContextManager: ...

    def inputs(self, image: Any, prompt: str, raw_prompt: bool = False) -> dict[str, Any]: ...

    def prefill_inputs(self, inputs: dict[str, Any], timer: StageTimer) -> Any: ...

    def next_position(self, record: Any) -> Any: ...

    def facts(self, record: Any) -> PromptFacts: ...

    def first_logits(self, record: Any) -> tuple[np.ndarray, Any]: ...

    def next_logits(self, token: int, position: Any, state: Any) -> tuple[np.ndarray, Any]: ...

    def snapshot(self, state: Any) -> Any: ...

    def restore(self, state: Any, mark: Any) -> Any: ...

    def flops(self, record: Any) -> FlopsReport: ...

    def layer_costs(self, record: Any) -> tuple[list[int], list[int]] | None: ...


@dataclass
class Generation:
    """One answer with its token counts, FLOPs and stage times; ``to_dict`` is the CLI's ``--json``."""

    answer: str
    token_ids: list[int]
    method: str
    keep: int | float | None
    visual_tokens_total: int
    visual_tokens_kept: int
    prompt_tokens: int
    prefill_tokens: int
    flops: FlopsReport
    cached_tokens: int = 0  # prefill rows whose keys and values a runner's prefix cache held
    timings_ms: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    layer_visual_tokens: list[int] | None = None  # in-LLM methods: visual tokens each decoder layer processed
    layer_macs: list[int] | None = None  # in-LLM methods: prefill MACs of each decoder layer (selector included)
    candidate_logprobs: list[float] | None = None  # ``candidates``: each one's log-likelihood as the answer

    @property
    def ttft_ms(self) -> float:
        """Time to first token: every stage up to and including prefill (which yields token 1)."""
        return sum(v for k, v in self.timings_ms.items() if k not in ("decode", "e2e"))

    @property
    def decode_steps(self) -> int:
        return max(len(self.token_ids) - 1, 0)  # the first token comes from prefill

    @property
    def decode_tokens_per_s(self) -> float | None:
        ms = self.timings_ms.get("decode", 0.0)
        return self.decode_steps / (ms / 1e3) if self.decode_steps > 0 and ms > 0 else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["flops"] = self.flops.to_dict()
        out["ttft_ms"], out["decode_tokens_per_s"] = self.ttft_ms, self.decode_tokens_per_s
        return out


def prefill(
    runner: Runner, record: Any, choose: TokenChooser, timer: StageTimer, scores: CandidateScores | None = None
) -> tuple[int, Any]:
    """The prompt through the decoder: the first token and the decoding state (KV cache). With ``scores``,
    its candidates are scored from the same prefill (outside the timed stage)."""
    with timer.stage("prefill"):
        logits, state = runner.first_logits(record)
        token = choose(logits)
    if scores is not None:
        scores.run(runner, logits, state, runner.next_position(record))
    return token, state


class CandidateScores:
    """Log-likelihoods of candidate answers (token-id sequences) as the continuation of a prompt.

    Candidates are teacher-forced through the decoder from the prompt's state, one step per token, walking
    the candidates' prefix tree depth first: a shared prefix runs once, and after each branch the state
    is rewound (``runner.snapshot`` / ``runner.restore``: a cache crop in PyTorch, nothing in ONNX
    Runtime, whose states are never written in place), so the greedy decode afterwards starts from the
    prompt's state as it was. A candidate's score is the sum of its tokens' log-probs.
    """

    def __init__(self, candidates: list[list[int]]) -> None:
        if not candidates or any(not c for c in candidates):
            raise ValueError("every candidate needs at least one token")
        self.candidates = [tuple(c) for c in candidates]
        self.logprobs: list[float] | None = None

    def run(self, runner: Runner, logits: np.ndarray, state: Any, position: Any) -> None:
        totals: dict[tuple[int, ...], float] = {}  # every candidate prefix -> its summed log-prob

        def visit(prefix: tuple[int, ...], logprobs: np.ndarray, state: Any) -> Any:
            children = dict.fromkeys(c[len(prefix)] for c in self.candidates if len(c) > len(prefix)
                                     and c[: len(prefix)] == prefix)  # fmt: skip
            for token in children:
                node = (*prefix, token)
                totals[node] = totals.get(prefix, 0.0) + float(logprobs[token])
                if any(len(c) > len(node) and c[: len(node)] == node for c in self.candidates):
                    mark = runner.snapshot(state)
                    row, after = runner.next_logits(token, position + len(prefix), state)
                    state = runner.restore(visit(node, _log_softmax(row), after), mark)
            return state

        visit((), _log_softmax(logits), state)
        self.logprobs = [totals[c] for c in self.candidates]


def _log_softmax(logits: Any) -> np.ndarray:
    x = np.asarray(_numpy(logits), dtype=np.float64).reshape(-1)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def decode_one_token(runner: Runner, token: int, position: Any, state: Any, choose: TokenChooser) -> tuple[int, Any]:
    logits, state = runner.next_logits(token, position, state)
    return choose(logits), state


def decode_n_tokens(
    runner: Runner, token: int, state: Any, position: Any, n: int, eos: set[int], choose: TokenChooser,
    timer: StageTimer,
) -> list[int]:  # fmt: skip
    """``token`` and up to ``n - 1`` more, stopping after an EOS token."""
    out: list[int] = []
    with timer.stage("decode"):
        for i in range(n):
            out.append(token)
            if token in eos or i == n - 1:
                break
            token, state = decode_one_token(runner, token, position + i, state, choose)
    return out


def decode(
    runner: Runner, record: Any, max_new_tokens: int, timer: StageTimer | None = None, eos: set[int] | None = None,
    scores: CandidateScores | None = None,
) -> list[int]:  # fmt: skip
    """Tokens after a prefill record: stops at an EOS token (``eos``, default the model's; an empty set
    never stops early), after ``max_new_tokens``, or at the end of the model's context. ``scores`` are
    filled from the same prefill."""
    timer = timer or runner.timer()
    eos = runner.adapter.eos_token_ids() if eos is None else eos
    position = runner.next_position(record)  # one past the unpruned prompt's largest position id
    n = new_token_room(runner.adapter.config, int(np.max(_numpy(position))), max_new_tokens)
    choose = TokenChooser(runner.sampling)
    with runner.scope():
        token, state = prefill(runner, record, choose, timer, scores)
        return decode_n_tokens(runner, token, state, position, n, eos, choose, timer)


def generate(
    runner: Runner, image: Any, prompt: str, max_new_tokens: int = 32, raw_prompt: bool = False, *,
    eos: set[int] | None = None, timer: StageTimer | None = None, candidates: list[list[int]] | None = None,
) -> Generation:  # fmt: skip
    """Answer ``prompt`` about ``image``: preprocess, vision and pruning, prefill, decode; per-stage wall
    times in ``timings_ms`` (into ``timer`` when given, e.g. inside an outer stage). With ``candidates``
    (token-id sequences), also each one's log-likelihood as the answer, from the same prefill
    (``CandidateScores``; not part of the timed stages)."""
    timer = timer or runner.timer()
    with runner.scope():
        with timer.stage("preprocess"):
            inputs = runner.inputs(image, prompt, raw_prompt)
        record = runner.prefill_inputs(inputs, timer)
        model_eos = runner.adapter.eos_token_ids()
        scores = CandidateScores(candidates) if candidates else None
        tokens = decode(runner, record, max_new_tokens, timer, model_eos if eos is None else eos, scores)
    facts, costs = runner.facts(record), runner.layer_costs(record)
    return Generation(
        answer=runner.adapter.decode([t for t in tokens if t not in model_eos]), token_ids=tokens,
        method=runner.cfg.method, keep=runner.cfg.keep, visual_tokens_total=facts.visual_total,
        visual_tokens_kept=facts.visual_kept, prompt_tokens=facts.prompt_len, prefill_tokens=facts.prefill_tokens,
        flops=runner.flops(record), cached_tokens=facts.cached_tokens, timings_ms=dict(timer.ms),
        peak_rss_mb=peak_rss_mb(),
        layer_visual_tokens=costs[0] if costs else None, layer_macs=costs[1] if costs else None,
        candidate_logprobs=scores.logprobs if scores is not None else None,
    )  # fmt: skip


def _numpy(x: Any) -> Any:
    return x.cpu().numpy() if hasattr(x, "cpu") else x
