"""ONNX Runtime backend: run a vtprune bundle (vision+prune -> embed merge -> decoder with KV cache).

The only module besides the TensorRT one that imports onnxruntime, and only when used. Preprocessing
uses the bundle's own processor files; nothing of the original checkpoint is read.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtprune.config import PruneConfig, SamplingConfig
from vtprune.errors import BackendUnavailableError, ConfigError, InputError
from vtprune.flops import FlopsReport, layer_macs, layerwise_prefill_macs, prefill_macs, prune_stage_macs
from vtprune.images import check_image_size
from vtprune.manifest import judged_precision
from vtprune.prune.alvts import lowrank_selector_macs, paper_selector_macs
from vtprune.runtime.generate import Generation, PromptFacts, generate
from vtprune.runtime.timing import StageTimer

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
KV_ROOM = 256  # decode steps a shared KV buffer holds beyond the prompt before it is regrown (doubled)


def layer_rows(cache: dict[str, np.ndarray]) -> np.ndarray:
    """Rows of each layer's cache, ``(layers,)`` int64 (``cache``: keys then values of each layer, in order)."""
    return np.array([a.shape[2] for a in list(cache.values())[::2]], np.int64)


class SharedKv:
    """The fused decoder's KV cache (``export.fused``): one preallocated buffer per layer's keys and values,
    ``(1, kv_heads, capacity, head_dim)``, bound as both the past input and the present output, so
    GroupQueryAttention writes the new token's keys and values in place and reads the first ``lengths[l]``
    rows of layer l (no copy of the cache per step; a decode step of the pocket VLM at 293 tokens: 60
    instead of 159 us per layer, 2-core Xeon); the plain decoder's prefill writes the prompt's rows into
    them too. Every layer holds the same number of rows, except in an in-LLM bundle's decode graph (routed
    layers keep fewer visual tokens). A state is (buffers, lengths): rows below the lengths are never
    written again, so an older state stays valid when decoding resumes from it (``snapshot`` /
    ``restore``)."""

    def __init__(self, arrays: dict[str, np.ndarray], lengths: np.ndarray) -> None:
        ort = import_ort()
        self.arrays, self.lengths = arrays, lengths  # lengths: (layers,) int64, in the arrays' layer order
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
        self.binding: Any = None  # the decoder's IO binding to these buffers, made on the first step

    @classmethod
    def holding(cls, past: dict[str, np.ndarray], room: int = KV_ROOM) -> SharedKv:
        """Buffers with ``room`` free rows past each layer's rows, holding ``past`` (each ``(1, kv_heads,
        length, head_dim)``, keys and values of one layer alike, layers in order)."""
        arrays = {}
        for name, a in past.items():
            buf = np.zeros((*a.shape[:2], a.shape[2] + room, a.shape[3]), a.dtype)
            buf[:, :, : a.shape[2]] = a
            arrays[name] = buf
        return cls(arrays, layer_rows(past))

    @property
    def capacity(self) -> int:
        """Rows the smallest buffer holds."""
        return min(a.shape[2] for a in self.arrays.values())

    @property
    def length(self) -> int:
        """Rows held (the longest layer's)."""
        return int(self.lengths.max())

    def advanced(self, steps: int) -> SharedKv:
        """The state after ``steps`` more rows were written to every layer (the same buffers)."""
        out = copy.copy(self)  # shares the buffers, their OrtValues and binding
        out.lengths = self.lengths + steps
        return out

    def room_for(self, steps: int) -> SharedKv:
        """This state, or a copy in buffers twice as large when ``steps`` more rows do not fit."""
        capacities = layer_rows(self.arrays)
        if np.all(self.lengths + steps <= capacities):
            return self
        rows = np.repeat(self.lengths, 2)  # keys and values of each layer
        return SharedKv.holding({n: a[:, :, :r] for (n, a), r in zip(self.arrays.items(), rows, strict=True)},
                                max(int(capacities.max()), steps + KV_ROOM))  # fmt: skip


def import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError("onnxruntime is not installed; pip install 'vtprune[ort]'") from None
    return onnxruntime


def make_session(
    model: Path | bytes, provider: str = "cpu", threads: int | None = None, external: dict[str, Any] | None = None
) -> Any:
    """An InferenceSession on ``provider`` from a graph's path or bytes (``external``: its external-data
    files' bytes by location), with a clear error when that provider is not available."""
    ort = import_ort()
    if provider not in PROVIDERS:
        raise ConfigError(f"--provider {provider!r} must be one of {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise BackendUnavailableError(
            f"ONNX Runtime here has no {PROVIDERS[provider]} (available: {', '.join(ort.get_available_providers())}); "
            "install onnxruntime-gpu on a machine with a supported GPU, or use --provider cpu"
        )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # A bundle holds three sessions; idle thread pools that keep spinning steal the cores the busy one
    # needs (2.7-3.3x slower end to end on 2 cores with default spinning, measured). Spinning within a
    # run, stopped when the run returns, is 13% faster on the pocket vision graph than no spinning.
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        opts.intra_op_num_threads = threads
    if external:
        names, buffers = list(external), [np.frombuffer(b, np.uint8) for b in external.values()]
        opts.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=[PROVIDERS[provider]])


class OrtVlm:
    """A bundle loaded for generation with ONNX Runtime."""

    def __init__(
        self, bundle: str | Path, provider: str = "cpu", threads: int | None = None, verify: bool = True,
        sampling: SamplingConfig | None = None, only: tuple[str, ...] | None = None, prefix_cache: bool = True,
    ):  # fmt: skip
        """``only``: open just these graphs (``("vision", "embed")`` for the prefill inputs of a model whose
        language model would not fit this machine's memory: ``vtprune predict``). ``prefix_cache``: keep the
        keys and values of the prompt's text before the image (``first_logits``)."""
        from transformers import AutoConfig

        from vtprune.manifest import Sealed
        from vtprune.models import adapter_for

        self.bundle = Path(bundle)
        self.sealed = Sealed(self.bundle, verify)  # every file used below is hashed from the bytes used
        self.manifest = self.sealed.manifest
        proc_dir = self.bundle / self.manifest["processor_dir"]
        cls = adapter_for(self.manifest["model"]["model_type"])
        with self.sealed.directory(self.manifest["processor_dir"]) as copy:
            config = AutoConfig.from_pretrained(str(copy), local_files_only=True, trust_remote_code=False)
            self.adapter = cls(None, cls.load_processor(copy), proc_dir, config)
        self.cfg = PruneConfig.from_dict(self.manifest["prune"])
        # In-LLM bundles (ALVTS, FastV) route tokens inside a prefill graph and decode with per-layer caches.
        self.routing = self.manifest["graphs"].get("prefill", {}).get("routing")
        graphs = ("vision", "embed", "prefill", "decode") if self.routing else ("vision", "embed", "decoder")
        self.sessions = self.open_sessions(tuple(g for g in graphs if only is None or g in only), provider, threads)
        self.step_graph = "decode" if self.routing else "decoder"
        self.decoder_io = self.manifest["graphs"][self.step_graph]
        self.dtype = self.manifest["export"].get("dtype", "fp32")
        self.precision = judged_precision(self.manifest["export"])  # what validation judges it as
        # the fused decoder's GroupQueryAttention updates a preallocated cache in place on the CPU
        self.fused = self.decoder_io.get("exporter") == "fused"
        self.shared_kv = self.fused and provider == "cpu"
        self.vision_quantized = self.manifest["export"].get("vision") is not None
        self.sampling = sampling or SamplingConfig()
        # in-LLM bundles route over the whole prompt in one prefill graph: nothing of it can be reused
        self.prefix_cache = prefix_cache and not self.routing
        self._prefix: tuple[bytes, Any] | None = None  # (the prefix's token ids and positions, its state)

    def close(self) -> None:
        """Release the sessions (and their thread pools and weights)."""
        self.sessions = {}

    def open_sessions(self, graphs: tuple[str, ...], provider: str, threads: int | None) -> dict[str, Any]:
        """One session per graph, each loaded from the file its sha256 was checked on (``Sealed.opened``);
        the TensorRT backend (``TrtVlm``) opens engines here instead."""
        sessions = {}
        for g in graphs:
            with self.sealed.opened(f"{g}.onnx", look_for=b"location") as (path, external):
                # A graph with tensors stored outside it goes to ONNX Runtime as sealed bytes, with its
                # external-data files in memory (their locations must be listed bundle files).
                if external:
                    data, files = self._external(g)
                    sessions[g] = make_session(data, provider, threads, files)
                else:
                    sessions[g] = make_session(path, provider, threads)
        return sessions

    def _external(self, graph: str) -> tuple[bytes, dict[str, bytes]]:
        import onnx

        from vtprune.export.onnx_io import external_locations

        data = self.sealed.read(f"{graph}.onnx")
        locations = external_locations(onnx.load_model_from_string(data))
        return data, {loc: self.sealed.mapped(loc) for loc in locations}  # GBs: mapped, not copied

    # --- preprocessing ---------------------------------------------------------------------------
    def inputs(self, image: Any, prompt: str, raw_prompt: bool = False) -> dict[str, torch.Tensor]:
        check_image_size(image, self.adapter.min_image_side)
        image = self._fit_image(image)
        if raw_prompt:
            self.adapter.check_prompt(prompt)
        text = prompt if raw_prompt else self.adapter.format_prompt(prompt)
        try:
            return self.adapter.prepare(image, text)
        except ValueError as exc:
            raise InputError(f"the {self.adapter.family} processor cannot use this image: {exc}") from None

    def _fit_image(self, image: Any) -> Any:
        """Qwen2.5-VL graphs are exported at one grid: resize the image to exactly that many patches."""
        grid = self.manifest["graphs"]["vision"]["meta"].get("grid_thw")
        if grid is None:
            return image
        p = self.adapter.patch_size
        return image.resize((grid[2] * p, grid[1] * p))

    def input_dtype(self, graph: str, name: str) -> np.dtype:
        """The element type ``graph`` declares for input ``name`` (the manifest's IO description)."""
        return np.dtype(next(e["dtype"] for e in self.manifest["graphs"][graph]["inputs"] if e["name"] == name))

    def typed(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` cast to the dtypes ``graph`` declares (fp16 bundles take fp16 embeddings and KV cache)."""
        return {name: np.asarray(v).astype(self.input_dtype(graph, name), copy=False) for name, v in feeds.items()}

    def vision_feeds(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        from vtprune.export.vision import vision_export

        meta = self.manifest["graphs"]["vision"]["meta"]
        return self.typed("vision", vision_export(self.adapter.family).graph_feeds(self.adapter, inputs, meta))

    # --- model stages -----------------------------------------------------------------------------
    def prefill_inputs(self, inputs: dict[str, torch.Tensor], timer: StageTimer) -> dict[str, Any]:
        """Vision+prune graph, token embedding and merge: the decoder's prefill inputs."""
        with timer.stage("vision"):
            out = self.sessions["vision"].run(None, self.vision_feeds(inputs))
        embeds_v, idx, valid = out[0][0], out[1][0], out[2][0]
        keep = idx[valid]  # kept visual tokens, ascending
        ids = inputs["input_ids"].numpy()
        image_pos = np.flatnonzero(ids[0] == self.adapter.image_token_id)
        with timer.stage("embed"):
            embeds = self.sessions["embed"].run(None, {"input_ids": ids})[0]  # (1, L, D)
        embeds[0, image_pos[keep]] = embeds_v[valid]
        text_pos = np.setdiff1d(np.arange(ids.shape[1]), image_pos)
        seq_keep = np.sort(np.concatenate([text_pos, image_pos[keep]]))  # (n,)
        positions = self.adapter.position_ids(inputs).numpy()[..., seq_keep]
        if self.cfg.positions == "contiguous":
            positions = np.broadcast_to(np.arange(seq_keep.size), positions.shape).copy()
        # the text before the first image token: every kept row, the same for every image (prefix cache)
        prefix = int(image_pos.min()) if image_pos.size else 0
        out = {"embeds": embeds[:, seq_keep], "positions": positions, "visual_kept": int(keep.size),
               "visual_total": int(image_pos.size), "prompt_len": int(ids.shape[1]), "keep_idx": keep,
               "seq_keep": seq_keep, "prefix_len": prefix, "prefix_cached": 0,
               "prefix_key": ids[0, :prefix].tobytes() + positions[..., :prefix].tobytes()}  # fmt: skip
        return out | (self._routing_rows(text_pos, image_pos, ids.shape[1]) if self.routing else {})

    def _routing_rows(self, text_pos: np.ndarray, image_pos: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """The prompt layout the prefill graph routes on (every prompt row is present in an in-LLM bundle)."""
        if image_pos.size < self.routing["min_visual_tokens"]:
            raise InputError(f"this image gives {image_pos.size} visual tokens; the bundle's prefill graph routes "
                             f"budgets up to {self.routing['min_visual_tokens'] - 1} and needs more")  # fmt: skip
        query = np.array([length - 1]) if self.routing["query"] == "last" else np.arange(image_pos.max() + 1, length)
        kept = min(min(k, image_pos.size) for k in self.routing["budgets"])  # the fewest any layer processes
        return {"text_rows": text_pos.astype(np.int64), "visual_rows": image_pos.astype(np.int64),
                "query_rows": query.astype(np.int64), "visual_kept": kept}  # fmt: skip

    def _empty_past(self) -> dict[str, np.ndarray]:
        io = self.decoder_io
        shape = (1, io["kv_heads"], 0, io["head_dim"])
        return {name: np.zeros(shape, self.input_dtype("decoder", name)) for name in self._past_names()}

    def _past_names(self) -> list[str]:
        return [i.name for i in self.sessions[self.step_graph].get_inputs() if i.name.startswith("past_key_values")]

    def decoder_step(self, embeds: np.ndarray, positions: np.ndarray, past: dict[str, np.ndarray]) -> tuple:
        """New tokens through the decoder (or the in-LLM decode graph) with the cache: last logits, cache."""
        feeds = {"inputs_embeds": embeds, "position_ids": positions}
        if not self.routing:  # the per-layer-cache decode graph takes no mask (one query after every key)
            total = embeds.shape[1] + next(iter(past.values())).shape[2]
            feeds["attention_mask"] = np.ones((1, total))
        elif self.fused:  # ... but the fused one takes each layer's length
            feeds["cache_lengths"] = layer_rows(past)[None]
        return self._run_lm(self.step_graph, self.typed(self.step_graph, feeds) | past)  # past: already typed

    def prefill(self, pre: dict[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The prompt through the decoder: last-position logits and the KV cache. In-LLM bundles route
        inside the prefill graph and leave each routed layer's kept visual tokens in ``pre["selected"]``."""
        if not self.routing:
            return self.decoder_step(pre["embeds"], pre["positions"], self._empty_past())
        feeds = {"inputs_embeds": pre["embeds"], "position_ids": pre["positions"]}
        feeds |= {k: pre[k] for k in ("text_rows", "visual_rows", "query_rows")}
        return self._run_lm("prefill", self.typed("prefill", feeds), pre)

    def _run_lm(self, graph: str, feeds: dict[str, np.ndarray], pre: dict[str, Any] | None = None) -> tuple:
        outs = self.sessions[graph].run(None, feeds)
        names = [o.name for o in self.sessions[graph].get_outputs()]
        result = dict(zip(names, outs, strict=True))
        presents = {n.replace("present", "past_key_values", 1): result[n] for n in names if n.startswith("present")}
        if pre is not None:
            pre["selected"] = [result[n][0] for n in names if n.startswith("selected.")]
        return result["logits"][:, -1].astype(np.float32, copy=False), presents

    # --- the runner contract (``runtime.generate``) ---------------------------------------------------
    def timer(self) -> StageTimer:
        return StageTimer()  # ONNX Runtime's run() returns host arrays: synchronous on every provider

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def next_position(self, pre: dict[str, Any]) -> np.ndarray:
        return pre["positions"].max(axis=-1, keepdims=True) + 1

    def facts(self, pre: dict[str, Any]) -> PromptFacts:
        return PromptFacts(pre["visual_total"], pre["visual_kept"], pre["prompt_len"], int(pre["embeds"].shape[1]),
                           pre.get("prefix_cached", 0))  # fmt: skip

    def first_logits(self, pre: dict[str, Any]) -> tuple[np.ndarray, Any]:
        if self.routing:  # the routed prefill's caches move into the shared buffers once
            logits, past = self.prefill(pre)
            return logits[0], SharedKv.holding(past, KV_ROOM) if self.shared_kv else past
        # the prompt's keys and values go straight into the shared buffers (or a new cache), after the text
        # before the image where the prefix cache holds it
        n = int(pre["embeds"].shape[1])
        p = pre["prefix_len"] if self.prefix_cache and 0 < pre["prefix_len"] < n else 0
        state = self._prefix_state(pre, n) if p else self._empty_state(n)
        logits, state = self._step(pre["embeds"][:, p:], pre["positions"][..., p:], state)
        return logits[0], state

    def _empty_state(self, rows: int) -> Any:
        """A decoding state holding nothing yet, with room for ``rows`` prompt rows (and ``KV_ROOM`` more)."""
        return SharedKv.holding(self._empty_past(), rows + KV_ROOM) if self.shared_kv else self._empty_past()

    def _prefix_state(self, pre: dict[str, Any], rows: int) -> Any:
        """The state after the text before the image: kept from the last prompt that began with the same
        tokens, else computed and kept (``first_logits`` then prefills only the image and the question). A
        robot asking about one frame after another with the same system prompt computes it once. The kept
        state is never written below its length (``SharedKv``; the plain decoder returns new arrays), so
        every prompt starts from it unchanged."""
        p, cached = pre["prefix_len"], self._prefix
        if (cached is None or cached[0] != pre["prefix_key"] or isinstance(cached[1], SharedKv) != self.shared_kv
                or (self.shared_kv and cached[1].capacity < rows)):  # fmt: skip
            _, state = self._step(pre["embeds"][:, :p], pre["positions"][..., :p], self._empty_state(rows))
            self._prefix = (pre["prefix_key"], state)
            return state
        pre["prefix_cached"] = p
        return cached[1]

    def next_logits(self, token: int, position: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        emb = self.sessions["embed"].run(None, {"input_ids": np.array([[token]], np.int64)})[0]
        logits, past = self._step(emb, position, past)
        return logits[0], past

    def _step(self, embeds: np.ndarray, positions: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        """New rows through the step graph with the decoding state (in place where the cache is shared)."""
        return (self._shared_step if self.shared_kv else self.decoder_step)(embeds, positions, state)

    def _shared_step(self, embeds: np.ndarray, positions: np.ndarray, kv: SharedKv) -> tuple[np.ndarray, SharedKv]:
        """New tokens through the fused decoder, its cache written in place (``SharedKv``)."""
        kv = kv.room_for(embeds.shape[1])
        session = self.sessions[self.step_graph]
        if kv.binding is None:  # the cache buffers are bound once (a few hundred us per step otherwise)
            kv.binding = session.io_binding()
            kv.binding.bind_output("logits")  # first: get_outputs() lists the outputs in binding order
            for name, value in kv.values.items():
                kv.binding.bind_ortvalue_input(name, value)
                kv.binding.bind_ortvalue_output(name.replace("past_key_values", "present", 1), value)
        feeds = {"inputs_embeds": embeds, "position_ids": positions}
        if self.routing:
            feeds["cache_lengths"] = kv.lengths[None]
        else:
            feeds["attention_mask"] = np.ones((1, kv.length + embeds.shape[1]), np.int64)
        for name, value in self.typed(self.step_graph, feeds).items():
            kv.binding.bind_cpu_input(name, np.ascontiguousarray(value))
        session.run_with_iobinding(kv.binding)
        logits = kv.binding.get_outputs()[0].numpy().copy()  # the bound output's buffer is reused next step
        return logits[:, -1].astype(np.float32, copy=False), kv.advanced(embeds.shape[1])

    def snapshot(self, past: Any) -> Any:
        """Decoding states are never changed by later steps (each step returns new arrays, or writes a shared
        cache only past the state's length): the state is its own mark."""
        return past

    def restore(self, past: Any, mark: Any) -> Any:
        return mark

    def generate(self, image: Any, prompt: str, max_new_tokens: int = 32, raw_prompt: bool = False) -> Generation:
        return generate(self, image, prompt, max_new_tokens, raw_prompt)

    def routed_rows(self, prefill: dict[str, Any]) -> dict[str, list[int]]:
        """In-LLM bundles: per decoder layer, the visual tokens, rows and key/value rows it processes and
        its selector's MACs (from the prefill graph's static budgets)."""
        r, dims = self.routing, self.adapter.text_dims()
        n_v, length = prefill["visual_total"], prefill["prompt_len"]
        visual = [min(k, n_v) for k in r["budgets"]]
        rows = [length - n_v + v for v in visual]
        kv_rows = [length if r["skip"] == "kv" and r["method"] == "alvts" else n for n in rows]
        ranks = {int(i): rank for i, rank in r.get("selector_ranks", {}).items()}
        n_q = prefill["query_rows"].size
        if r.get("selector", "lowrank") == "paper":  # over every row of the prompt (skipped rows stay)
            selector = [paper_selector_macs(dims.hidden, ranks[i], length) if i in ranks else 0
                        for i in range(dims.layers)]  # fmt: skip
        else:
            selector = [lowrank_selector_macs(dims.hidden, ranks[i], n_q, n_v) if i in ranks else 0
                        for i in range(dims.layers)]  # fmt: skip
        return {"visual": visual, "rows": rows, "kv_rows": kv_rows, "selector": selector}

    def layer_costs(self, prefill: dict[str, Any]) -> tuple[list[int], list[int]] | None:
        """In-LLM bundles: visual tokens and prefill MACs (selector included) of each decoder layer."""
        if not self.routing:
            return None
        r, dims = self.routed_rows(prefill), self.adapter.text_dims()
        macs = [layer_macs(dims, n, m) + c for n, m, c in zip(r["rows"], r["kv_rows"], r["selector"], strict=True)]
        return r["visual"], macs

    def flops(self, prefill: dict[str, Any]) -> FlopsReport:
        dims = self.adapter.text_dims()
        unpruned = prefill_macs(dims, prefill["prompt_len"])
        if self.routing:
            r = self.routed_rows(prefill)
            return FlopsReport(unpruned, layerwise_prefill_macs(dims, r["rows"], r["kv_rows"]), sum(r["selector"]))
        meta = self.manifest["graphs"]["vision"]["meta"]
        sizes = [meta["per_crop"], meta["hr_capacity"]] if "per_crop" in meta else [prefill["visual_total"]]
        stage = prune_stage_macs(self.cfg, sizes, dims.hidden)
        n = int(prefill["embeds"].shape[1])
        return FlopsReport(unpruned, prefill_macs(dims, n), stage)
