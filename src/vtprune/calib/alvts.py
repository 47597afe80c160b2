"""Calibrated ALVTS selectors (ALGORITHMS.md §2.3, "importance-consistency constrained" low-rank factors).

From calibration image-question pairs (easy-vqa *train* questions, or a directory of images) the
unpruned model runs once per pair; each layer's normalised inputs give the second moments C_Q (query
rows) and C_V (visual rows). Per layer the bilinear form M of the head-summed logits is whitened,
truncated and un-whitened (``prune.alvts.factor_whitened``). Held-out pairs then pick the rank: the
smallest r in {16, 32, 64, 128, 256} whose top-k agrees with the exact attention importance (RoPE and
causal mask included, recomputed from the layer's own projections) at recall@k >= gamma; if none does,
the rank with the best recall. The output directory holds ``factors.safetensors`` and ``card.json``
(settings, per-layer rank, recall of the calibrated and of the data-free selector, selector and layer
MACs, and the factors' sha256, checked when loaded).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vtprune.calib.config import CalibConfig
from vtprune.config import PruneConfig
from vtprune.errors import ConfigError, InputError
from vtprune.files import read_json
from vtprune.flops import layer_macs
from vtprune.prune.alvts import (
    LayerSelector,
    data_free_selector,
    factor_whitened,
    logit_scale,
    qk_bilinear,
    qk_product,
)
from vtprune.prune.alvts import recall_at_k as _recall
from vtprune.prune.attention import QkWeights, visual_importance

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_QUESTION = "Describe the image."


@dataclass
class _LayerStats:
    c_q: Tensor
    c_v: Tensor
    n_q: int = 0
    n_v: int = 0


@dataclass
class _Heldout:
    x_q: Tensor  # (n_q, d)
    x_v: Tensor  # (N_v, d)
    exact: Tensor  # (N_v,)


def calibration_pairs(data: str, n: int, seed: int) -> list[tuple[Any, str]]:
    """``n`` (image, question) pairs: easy-vqa *train* questions, or images of a directory with an
    optional ``questions.json`` mapping file names to questions (default: a generic description request)."""
    from PIL import Image

    if data == "easy-vqa":
        from vtprune.eval.data import load_questions, subsample

        picked = subsample(load_questions("train"), n, seed)
        return [(Image.open(q.image_path).convert("RGB"), q.question) for q in picked]
    root = Path(data)
    if not root.is_dir():
        raise InputError(f"--data {data!r} is neither 'easy-vqa' nor a directory of images")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"--data {root}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    questions = read_json(root / "questions.json", InputError) if (root / "questions.json").is_file() else {}
    files = sorted(random.Random(seed).sample(files, min(n, len(files))))
    return [(Image.open(p).convert("RGB"), str(questions.get(p.name, DEFAULT_QUESTION))) for p in files]


def _layer_inputs(adapter: Any, embeds: Tensor, positions: Tensor) -> list[Tensor]:
    """Every layer's input hidden states (1, L, D) from one unpruned prefill."""
    captured: list[Tensor] = []
    layers = adapter.decoder.layers
    hooks = [layer.register_forward_pre_hook(lambda m, args: captured.append(args[0])) for layer in layers]
    try:
        mask = torch.ones(1, embeds.shape[1], dtype=torch.long)
        adapter.decoder(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return captured


@torch.inference_mode()
def calibrate(
    adapter: Any, pairs: Sequence[tuple[Any, str]], cfg: CalibConfig, progress: Callable[[Iterable], Iterable] = iter
) -> tuple[dict[int, LayerSelector], dict[str, Any]]:
    """Fit a selector per layer; returns the selectors and the card (JSON-ready)."""
    from vtprune.runtime.pipeline import PrunedVlm

    dims, layers = adapter.text_dims(), adapter.decoder.layers
    weights = [QkWeights.of(layer.self_attn, dims.heads, dims.kv_heads) for layer in layers]
    n_held = max(1, int(round(cfg.heldout * len(pairs))))
    if len(pairs) - n_held < 1:
        raise ConfigError(f"{len(pairs)} calibration pairs leave none to fit with {n_held} held out")
    stats = [_LayerStats(torch.zeros(dims.hidden, dims.hidden, dtype=torch.float64),
                         torch.zeros(dims.hidden, dims.hidden, dtype=torch.float64)) for _ in layers]  # fmt: skip
    held: list[list[_Heldout]] = [[] for _ in layers]
    pipe = PrunedVlm(adapter, PruneConfig())
    n_text, n_visual, n_query = [], [], []
    for i, (image, question) in enumerate(progress(pairs)):
        prefill = pipe.build_prefill(pipe.inputs(image, question))
        query, visual = prefill.query_rows(cfg.query), prefill.visual_rows
        n_visual.append(visual.numel())
        n_query.append(query.numel())
        n_text.append(prefill.embeds.shape[1] - visual.numel())
        rope = adapter.decoder.rotary_emb(prefill.embeds, prefill.position_ids)
        for li, h in enumerate(_layer_inputs(adapter, prefill.embeds, prefill.position_ids)):
            x = layers[li].input_layernorm(h)[0].float()
            if i < len(pairs) - n_held:
                s = stats[li]
                s.c_q += (x[query].T @ x[query]).double()
                s.c_v += (x[visual].T @ x[visual]).double()
                s.n_q, s.n_v = s.n_q + query.numel(), s.n_v + visual.numel()
            else:
                exact = visual_importance(weights[li], x, rope, query, visual)  # softmax over every key
                held[li].append(_Heldout(x[query].clone(), x[visual].clone(), exact))
    selectors, rows = {}, []
    k_eff = min(cfg.k, min(n_visual))
    n_mean = int(round(sum(n_text) / len(n_text) + sum(n_visual) / len(n_visual)))
    for li, w in enumerate(weights):
        _, u = qk_bilinear(w)
        thin = qk_product(w)
        ranks = [r for r in cfg.ranks if r <= thin[0].shape[1]] or [thin[0].shape[1]]  # rank(M) <= H_kv * hd
        s = stats[li]
        a, b = factor_whitened(thin, s.c_q / s.n_q, s.c_v / s.n_v, max(ranks), cfg.eps)
        full = LayerSelector(a, b, u, logit_scale(w))
        recalls = {r: _mean_recall(full.truncated(r), held[li], k_eff) for r in ranks}
        rank = next((r for r in ranks if recalls[r] >= cfg.gamma), max(ranks, key=lambda r: (recalls[r], -r)))
        selectors[li] = full.truncated(rank)
        free = _mean_recall(data_free_selector(w, rank), held[li], k_eff)
        rows.append({"layer": li, "rank": rank, "recall": recalls[rank], "recall_data_free": free,
                     "recall_by_rank": {str(r): v for r, v in recalls.items()},
                     "selector_macs": selectors[li].macs(_mean(n_query), _mean(n_visual)),
                     "layer_macs": layer_macs(dims, n_mean)})  # fmt: skip
    card = {
        "kind": "calibrated", "settings": asdict(cfg), "k_measured": k_eff,
        "pairs": {"fit": len(pairs) - n_held, "heldout": n_held},
        "model": {"family": adapter.family, "path": str(adapter.path), "hidden": dims.hidden, "layers": dims.layers},
        "mean_recall": sum(r["recall"] for r in rows) / len(rows),
        "mean_recall_data_free": sum(r["recall_data_free"] for r in rows) / len(rows),
        "layers": rows,
    }  # fmt: skip
    return selectors, card


def _mean(values: Sequence[int]) -> int:
    return round(sum(values) / len(values))


def _mean_recall(sel: LayerSelector, held: Sequence[_Heldout], k: int) -> float:
    return sum(_recall(sel.scores(h.x_q, h.x_v), h.exact, k) for h in held) / len(held)


def format_card(card: dict[str, Any]) -> str:
    """A per-layer recall table (calibrated vs data-free) and the selector's share of a layer's MACs."""
    lines = [f"layer  rank  recall@{card['k_measured']}  data-free  selector/layer MACs"]
    for r in card["layers"]:
        share = 100 * r["selector_macs"] / r["layer_macs"]
        recall, free = r["recall"], r["recall_data_free"]
        lines.append(f"{r['layer']:>5}  {r['rank']:>4}  {recall:>9.3f}  {free:>9.3f}  {share:>10.2f}%")
    lines.append(f"mean recall: calibrated {card['mean_recall']:.3f}, data-free {card['mean_recall_data_free']:.3f} "
                 f"({card['pairs']['fit']} fit / {card['pairs']['heldout']} held-out pairs)")  # fmt: skip
    return "\n".join(lines)
