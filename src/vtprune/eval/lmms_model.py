"""vtprune as an lmms-eval model, so the standard benchmarks run with pruning switched on::

    pip install lmms-eval==0.7.3          # see docs/evaluation.md for a CPU-only install
    python -m lmms_eval --model vtprune --model_args pretrained=DIR,method=gprune,keep=64 --tasks pope ...

``pretrained`` is a checkpoint directory or built-in model name (run in PyTorch with ``method``, ``keep``
and the other ``PruneConfig`` fields) or a bundle directory (run on ONNX Runtime, ``backend=trt`` for
its TensorRT engines; its pruning is fixed at export). lmms-eval finds the model through the
``lmms_eval.models`` entry point that vtprune's package metadata declares (``manifest``); nothing in
lmms-eval is patched.

Requests: ``generate_until`` answers greedily (``max_new_tokens`` from the task's ``gen_kwargs``, cut at
its ``until`` strings); ``loglikelihood`` scores every continuation of one context from a single prefill
(``runtime.generate.CandidateScores``) and returns lmms-eval's (loss, is_greedy) pairs, loss being the
negative summed log-probability. The continuation is scored as the start of the assistant's reply, so
its leading space (lmms-eval's ``" " + choice``) is dropped. One image per question (the first).

The request handling lives in ``Bridge`` (no lmms-eval import, tested without it); ``VtpruneLmms``, the
``lmms`` subclass lmms-eval instantiates, is built on first access when lmms-eval is importable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vtprune.errors import ConfigError, InputError

MODEL_ID = "vtprune"
DEFAULT_MAX_NEW_TOKENS = 32
# PruneConfig fields accepted as model_args, with their parsers (model_args arrive as strings)
_PRUNE_FIELDS: dict[str, Callable[[str], Any]] = {
    "theta": float, "tau": float, "iters": int, "degree": str, "positions": str, "layer": int, "rank": int,
    "query": str, "skip": str, "budget": str, "selector": str, "factors": str, "seed": int,
}  # fmt: skip


class Bridge:
    """lmms-eval's request lists answered by a vtprune runner (PyTorch, ONNX Runtime or TensorRT)."""

    def __init__(
        self, pretrained: str = "pocket", method: str | None = None, keep: str | int | None = None,
        backend: str | None = None, provider: str = "cpu", threads: int | str | None = None,
        dtype: str = "fp32", device: str | None = None, cache_dir: str | None = None,
        max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS, **kwargs: Any,
    ) -> None:  # fmt: skip
        from vtprune.api import open_runner
        from vtprune.cliargs import parse_keep
        from vtprune.config import PruneConfig

        kwargs.pop("batch_size", None)  # lmms-eval passes these to every model; one question at a time here
        kwargs.pop("max_batch_size", None)
        unknown = set(kwargs) - set(_PRUNE_FIELDS)
        if unknown:
            raise ConfigError(f"vtprune model_args: unknown {', '.join(sorted(unknown))}; accepted: pretrained, "
                              f"method, keep, backend, provider, threads, dtype, device, cache_dir, max_new_tokens, "
                              f"{', '.join(_PRUNE_FIELDS)}")  # fmt: skip
        is_bundle = (Path(pretrained) / "manifest.json").is_file()
        if is_bundle:
            if method or keep or kwargs:
                raise ConfigError("a bundle's pruning is fixed at export; drop method/keep from model_args")
            backend = backend or "ort"
            prune = None
        else:
            if backend not in (None, "torch"):
                raise ConfigError(f"backend={backend} runs a bundle; {pretrained} is not one")
            backend = "torch"
            k = parse_keep(str(keep)) if keep not in (None, "") else None
            fields = {name: _PRUNE_FIELDS[name](v) for name, v in kwargs.items()}
            prune = PruneConfig(method=method or ("gprune" if k is not None else "none"), keep=k, **fields)
        device = _torch_device(device) if backend == "torch" else "cpu"
        self.max_new_tokens = int(max_new_tokens)
        self._context = open_runner(
            pretrained, backend, provider=provider, threads=int(threads) if threads else None, prune=prune,
            dtype=dtype, device=device, cache_dir=Path(cache_dir) if cache_dir else None,
        )  # fmt: skip
        self.runner = self._context.__enter__()

    def close(self) -> None:
        self._context.__exit__(None, None, None)

    def generate(self, requests: Sequence[tuple], task_dict: Mapping[str, Any]) -> list[str]:
        """``generate_until`` argument tuples (ctx, gen_kwargs, doc_to_visual, doc_id, task, split)."""
        from vtprune.runtime.generate import generate

        out = []
        for ctx, gen_kwargs, doc_to_visual, doc_id, task, split in _progress(requests, "vtprune generate"):
            gen_kwargs = dict(gen_kwargs or {})
            n = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            text = generate(self.runner, self._image(doc_to_visual, task_dict, task, split, doc_id), ctx, n).answer
            until = gen_kwargs.get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                if stop:
                    text = text.split(stop, 1)[0]
            out.append(text)
        return out

    def loglikelihood(self, requests: Sequence[tuple], task_dict: Mapping[str, Any]) -> list[tuple[float, bool]]:
        """``loglikelihood`` argument tuples (ctx, continuation, doc_to_visual, doc_id, task, split): the
        continuations of one context are scored from one prefill."""
        from vtprune.runtime.generate import generate

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple, tuple[Any, list[tuple[int, list[int]]]]] = {}  # context -> (doc_to_visual, members)
        for i, (ctx, cont, doc_to_visual, doc_id, task, split) in enumerate(requests):
            if callable(cont):  # output_type: loglikelihood passes doc_to_target itself
                cont = cont(task_dict[task][split][doc_id])
            ids = self.runner.adapter.tokenizer.encode(str(cont).lstrip(), add_special_tokens=False)
            if not ids:
                raise InputError(f"{task} doc {doc_id}: empty continuation {cont!r}")
            groups.setdefault((ctx, doc_id, task, split), (doc_to_visual, []))[1].append((i, list(ids)))
        for (ctx, doc_id, task, split), (doc_to_visual, members) in _progress(groups.items(), "vtprune likelihood"):
            cands = [ids for _, ids in members]
            image = self._image(doc_to_visual, task_dict, task, split, doc_id)
            gen = generate(self.runner, image, ctx, max(len(c) for c in cands), eos=set(), candidates=cands)
            for (i, ids), lp in zip(members, gen.candidate_logprobs or [], strict=True):
                results[i] = (-lp, gen.token_ids[: len(ids)] == ids)
        return [r for r in results if r is not None]

    def _image(self, doc_to_visual: Any, task_dict: Mapping[str, Any], task: str, split: str, doc_id: int) -> Any:
        from vtprune.images import check_image_size, to_rgb

        visuals = doc_to_visual(task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        images = [v for v in visuals or [] if hasattr(v, "convert")]
        if not images:
            raise InputError(f"{task} doc {doc_id}: vtprune's lmms-eval model answers about an image, and this "
                             "document has none")  # fmt: skip
        image = to_rgb(images[0])
        check_image_size(image, self.runner.adapter.min_image_side, f"{task} doc {doc_id}'s image")
        return image


def _progress(items: Any, desc: str) -> Any:
    import sys

    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="q", file=sys.stderr, dynamic_ncols=True, leave=False)


def _torch_device(device: str | None) -> str:
    """lmms-eval passes ``device=cuda`` by default: honoured where CUDA is available, else the CPU."""
    if device and device.startswith("cuda"):
        import torch

        return device if torch.cuda.is_available() else "cpu"
    return device or "cpu"


@functools.cache
def _model_class() -> type:
    from lmms_eval.api.instance import GenerationResult
    from lmms_eval.api.model import lmms

    class VtpruneLmms(lmms):
        """lmms-eval's view of vtprune (see the module docstring)."""

        is_simple = True

        def __init__(self, **model_args: Any) -> None:
            super().__init__()
            self.bridge = Bridge(**model_args)

        def generate_until(self, requests: list) -> list[str]:
            return self.bridge.generate([r.args for r in requests], self.task_dict)

        def loglikelihood(self, requests: list) -> list:
            # lmms-eval 0.7.3 turns bare tuples into strings; GenerationResult passes them through
            return [GenerationResult(text=r) for r in self.bridge.loglikelihood([q.args for q in requests],
                                                                               self.task_dict)]  # fmt: skip

        def generate_until_multi_round(self, requests: list) -> list[str]:
            raise NotImplementedError("vtprune's lmms-eval model answers single-round questions")

    VtpruneLmms.__module__ = __name__
    return VtpruneLmms


def __getattr__(name: str) -> Any:
    if name == "VtpruneLmms":
        return _model_class()
    raise AttributeError(name)


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: ``--model vtprune``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VtpruneLmms")
