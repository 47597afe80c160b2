"""Every engine against ONNX Runtime, graph by graph, through Polygraphy's Comparator.

``vtprune check BUNDLE --backend trt`` first compares the whole TensorRT pipeline with PyTorch
(``compare_backends``). This module adds one row per engine. ONNX Runtime runs the bundle's ONNX
graphs on the image and prompt and records what each graph was fed: the vision inputs, the embedding
ids, and the decoder's prefill and first decode steps with ONNX Runtime's own KV cache. Polygraphy's
``Comparator`` then runs the same feeds through ONNX Runtime (``OnnxrtRunner``) and through the engine
(``SessionRunner``, over the runner's ``EngineSession``). A difference therefore belongs to that engine
alone, not to what an upstream engine handed it.

What is compared:
- float outputs: Polygraphy's ``CosineSimilarityCompareFunc``, against the fp16 bounds of
  ``vtprune.check.validate.MIN_COSINE["fp16"]`` (logits 0.99, everything else 0.999), since TensorRT may pick
  reduced-precision tactics. The max abs diff is reported beside it.
- integer and bool outputs (kept indices, validity): must be identical. Where the kept sets differ
  (near-tied scores swapped by fp16), the row reports their IoU and leaves the float outputs of that
  call unjudged: the pipeline check's tie rule ("kept visual indices") judges the swap.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtprune.check.validate import MIN_COSINE, iou
from vtprune.errors import BackendUnavailableError

POLYGRAPHY_HINT = "pip install 'vtprune[trt]'"


def _polygraphy() -> Any:
    try:
        import polygraphy.comparator as comparator
    except ImportError:
        raise BackendUnavailableError(f"engine parity needs Polygraphy: {POLYGRAPHY_HINT}") from None
    return comparator


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Polygraphy logs every inference at INFO; keep its errors only."""
    from polygraphy.logger import G_LOGGER

    before = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.module_severity = before


class _Recorder:
    """An ONNX Runtime session that keeps a copy of the feeds of its first ``limit`` calls."""

    def __init__(self, session: Any, limit: int) -> None:
        self.session, self.limit, self.feeds = session, limit, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def run(self, names: Any, feeds: dict[str, Any]) -> list[Any]:
        if len(self.feeds) < self.limit:
            self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.session.run(names, feeds)


def record_feeds(bundle: Path, image: Any, prompt: str, steps: int) -> tuple[Any, dict[str, list[dict]]]:
    """Run the bundle in ONNX Runtime (prefill + ``steps`` greedy tokens); return it and each graph's feeds."""
    from vtprune.backends.ort import OrtVlm
    from vtprune.runtime.generate import decode
    from vtprune.runtime.timing import StageTimer

    ort_vlm = OrtVlm(bundle, verify=False, prefix_cache=False)  # the prompt whole, as the engines take it
    recorders = {g: _Recorder(s, 1 + steps) for g, s in ort_vlm.sessions.items()}
    ort_vlm.sessions = recorders
    pre = ort_vlm.prefill_inputs(ort_vlm.inputs(ort_vlm._fit_image(image), prompt), StageTimer())
    decode(ort_vlm, pre, steps, eos=set())
    ort_vlm.sessions = {g: r.session for g, r in recorders.items()}
    return ort_vlm, {g: r.feeds for g, r in recorders.items()}


def _runner_class() -> type:
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class SessionRunner(BaseRunner):
        """A Polygraphy runner over the TensorRT runner's ``EngineSession`` (ONNX Runtime's face)."""

        def __init__(self, session: Any, name: str) -> None:
            super().__init__(name=name, prefix="vtprune-session")
            self.session = session

        def activate_impl(self) -> None:  # the session is open already; nothing to set up or free
            pass

        def deactivate_impl(self) -> None:
            pass

        def get_input_metadata_impl(self) -> Any:
            meta = TensorMetadata()
            for spec in self.session.specs:
                if spec.is_input:
                    dtype = torch.empty(0, dtype=spec.dtype).numpy().dtype
                    meta.add(spec.name, dtype=dtype, shape=[None if d < 0 else d for d in spec.shape])
            return meta

        def infer_impl(self, feed_dict: dict[str, Any]) -> OrderedDict:
            start = time.perf_counter()
            outs = self.session.run(None, feed_dict)
            self.inference_time = time.perf_counter() - start
            names = [o.name for o in self.session.get_outputs()]
            host = [o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outs]
            return OrderedDict(zip(names, host, strict=True))

    return SessionRunner


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Max abs diff in fp64; inf when the shapes differ (Polygraphy's shape check fails the row too)."""
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0


def _min_cosine(name: str) -> float:
    return MIN_COSINE["fp16"]["logits" if "logits" in name else "embeds"]


def compare_graph(graph: str, reference: Any, engine: Any, feeds: list[dict]) -> dict[str, Any]:
    """One row: ``engine`` (session face) against ``reference`` (ORT session) on ``feeds``."""
    comparator = _polygraphy()
    from polygraphy.backend.onnxrt import OnnxrtRunner

    runners = [OnnxrtRunner(reference, name="onnxruntime"), _runner_class()(engine, name="tensorrt")]
    with _quiet():
        results = comparator.Comparator.run(runners, data_loader=feeds)
    ort_iters, trt_iters = results[0][1], results[1][1]
    floats = [n for n, a in ort_iters[0].items() if np.issubdtype(a.dtype, np.floating)]
    others = [n for n in ort_iters[0] if n not in floats]
    # Calls whose integer outputs (kept indices) agree are judged on their float outputs.
    same = [all(np.array_equal(o[n], t[n]) for n in others) for o, t in zip(ort_iters, trt_iters, strict=True)]
    ious = [iou(o[n].ravel(), t[n].ravel()) for o, t in zip(ort_iters, trt_iters, strict=True) for n in others
            if np.issubdtype(o[n].dtype, np.integer)]  # fmt: skip
    row: dict[str, Any] = {"check": f"{graph} engine vs ONNX Runtime (Polygraphy)", "ok": True, "calls": len(feeds)}
    judged = [i for i, s in enumerate(same) if s]
    if floats and judged:
        bounds = {n: _min_cosine(n) for n in floats}
        func = comparator.CosineSimilarityCompareFunc(
            cosine_similarity_threshold=bounds,
            find_output_func=lambda name, _i, _it: [name] if name in bounds else [],
        )
        kept = type(results)()
        for runner, iters in results:
            kept.append((runner, [iters[i] for i in judged]))
        with _quiet():
            accuracy = comparator.Comparator.compare_accuracy(kept, compare_func=func)
        per_call = next(iter(accuracy[0].values()))
        # Polygraphy gives a bare False instead of a result when the shapes differ
        mismatched = sorted({n for call in per_call for n, r in call.items() if isinstance(r, bool)})
        worst = min(((r.cosine_similarity, n) for call in per_call for n, r in call.items() if not isinstance(r, bool)),
                    default=(1.0, ""))  # fmt: skip
        if mismatched:
            row["shape_mismatch"] = mismatched
        row |= {"ok": bool(accuracy), "min_cosine": worst[0], "worst_output": worst[1],
                "max_abs_diff": max(_max_abs_diff(ort_iters[i][n], trt_iters[i][n]) for i in judged for n in floats)}
    if ious:
        row["kept_iou"] = min(ious)
    if not all(same):
        row["unjudged_calls"] = same.count(False)  # kept sets differ: judged end to end by the tie rule
    return row


def engine_parity(bundle: Path, engines: Any, image: Any, prompt: str, steps: int = 2) -> list[dict[str, Any]]:
    """One row per engine of ``engines`` (a loaded ``TrtVlm``), each against ONNX Runtime on the feeds
    ONNX Runtime's own run of the bundle produced (prefill and ``steps`` decode steps)."""
    _polygraphy()
    ort_vlm, feeds = record_feeds(bundle, image, prompt, steps)
    return [compare_graph(g, ort_vlm.sessions[g], s, feeds[g]) for g, s in engines.sessions.items() if feeds[g]]
