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
    PaperSelector,
    data_free_selector,
    factor_whitened,
    logit_scale,
    paper_selector,
    qk_bilinear,
    qk_product,
)
from vtprune.prune.alvts import recall_at_k as _recall
from vtprune.prune.attention import QkWeights, attention_rows, visual_importance

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


# --- the paper's calibration (ALGORITHMS.md §2.1b) ---------------------------------------------------
@dataclass
class _PaperPair:
    x: Tensor  # (L, d) normalised layer input, sequence order
    visual: Tensor  # (N_v,) visual rows
    text: Tensor  # (n_t,) text rows after the image
    target: Tensor  # (N_v,) the full-rank score, normalised to mean 1


def full_rank_score(w: QkWeights, x: Tensor, rope: tuple[Tensor, Tensor], visual: Tensor, text: Tensor) -> Tensor:
    """The paper's score S = S_V2V * S_T2V from the layer's real attention (every head at full rank, RoPE,
    causal, probabilities averaged over heads), as ``PaperSelector`` defines its terms: what the selector
    is fitted to. (L, d) -> (N_v,)."""
    pos = torch.arange(x.shape[0])
    probs = attention_rows(w, x, x, rope, rope, pos, pos).mean(dim=0)  # (L, L)
    to_visual = probs[:, visual]
    v2v = to_visual[visual].sum(dim=0) / (visual.numel() - torch.arange(visual.numel()))  # over the rows seeing it
    return v2v * (to_visual[text].mean(dim=0) if text.numel() else 1.0)


def _unit_mean(s: Tensor) -> Tensor:
    return s / s.mean().clamp_min(1e-30)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two (N,) vectors (ties broken by position)."""
    ra, rb = (v.argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()).clamp_min(1e-30))


def _paper_loss(sel: PaperSelector, pairs: Sequence[_PaperPair]) -> Tensor:
    """Mean over pairs of the MSE between the selector's and the full-rank score, each scaled to mean 1
    (the raw scores are products of two mean attentions, ~1/N_v^2: scaling makes layers comparable)."""
    losses = [(_unit_mean(sel.scores_all(p.x[None], p.visual)[0]) - p.target).pow(2).mean() for p in pairs]
    return torch.stack(losses).mean()


def _paper_metrics(sel: PaperSelector, pairs: Sequence[_PaperPair], k: int) -> dict[str, float]:
    with torch.no_grad():
        scores = [sel.scores_all(p.x[None], p.visual)[0] for p in pairs]
    n = len(pairs)
    return {"recall": sum(_recall(s, p.target, min(k, s.numel())) for s, p in zip(scores, pairs, strict=True)) / n,
            "spearman": sum(spearman(s, p.target) for s, p in zip(scores, pairs, strict=True)) / n}  # fmt: skip


def _fit_layer(w: QkWeights, fit: Sequence[_PaperPair], cfg: CalibConfig, seed: int) -> PaperSelector:
    """SVD initialisation, then Adam on the factors only (``cfg.steps`` steps of ``cfg.batch`` pairs)."""
    init = paper_selector(w, cfg.rank).factors
    a, b = (t.detach().clone().requires_grad_(True) for t in (init.a, init.b))
    opt = torch.optim.Adam([a, b], lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(cfg.steps):
            batch = [fit[int(i)] for i in torch.randperm(len(fit), generator=gen)[: cfg.batch]]
            opt.zero_grad()
            loss = _paper_loss(PaperSelector(LayerSelector(a, b, init.u, init.scale)), batch)
            loss.backward()
            opt.step()
    return PaperSelector(LayerSelector(a.detach(), b.detach(), init.u, init.scale))


def calibrate_paper(
    adapter: Any, pairs: Sequence[tuple[Any, str]], cfg: CalibConfig, progress: Callable[..., Iterable] = iter
) -> tuple[dict[int, LayerSelector], dict[str, Any]]:
    """The paper's calibration: per layer, the selector's W_Q / W_K factors (SVD-initialised at rank
    ``cfg.rank``) are tuned to minimise the MSE between their score and the full-rank score on the fit
    pairs; the VLM is frozen. Returns the factors (``prune.factors`` format, kind ``paper``) and the card:
    per layer the fit loss before and after, and recall@k and Spearman against the full-rank score on the
    held-out pairs, for the SVD initialisation and the tuned factors. Deterministic for ``cfg.seed``."""
    from vtprune.runtime.pipeline import PrunedVlm

    dims, layers = adapter.text_dims(), adapter.decoder.layers
    weights = [QkWeights.of(layer.self_attn, dims.heads, dims.kv_heads) for layer in layers]
    n_held = max(1, int(round(cfg.heldout * len(pairs))))
    if len(pairs) - n_held < 1:
        raise ConfigError(f"{len(pairs)} calibration pairs leave none to fit with {n_held} held out")
    pipe = PrunedVlm(adapter, PruneConfig())
    data: list[list[_PaperPair]] = [[] for _ in layers]
    with torch.inference_mode():
        for image, question in progress(pairs):
            prefill = pipe.build_prefill(pipe.inputs(image, question))
            visual = prefill.visual_rows
            text = torch.arange(int(visual.max()) + 1, prefill.embeds.shape[1])
            cos, sin = adapter.decoder.rotary_emb(prefill.embeds, prefill.position_ids)
            rope = (cos[0].float(), sin[0].float())
            for li, h in enumerate(_layer_inputs(adapter, prefill.embeds, prefill.position_ids)):
                x = layers[li].input_layernorm(h)[0].float().clone()
                target = _unit_mean(full_rank_score(weights[li], x, rope, visual, text))
                data[li].append(_PaperPair(x, visual, text, target))
    for layer_pairs in data:  # outside inference mode: tensors autograd may save for the factors' gradients
        for p in layer_pairs:
            p.x, p.visual, p.text, p.target = (t.clone() for t in (p.x, p.visual, p.text, p.target))
    n_fit = len(pairs) - n_held
    k = min(cfg.k, min(int(p.visual.numel()) for p in data[0]))
    selectors, rows = {}, []
    layer_bar = progress(range(len(weights)), unit="layer") if progress is not iter else range(len(weights))
    for li in layer_bar:
        w = weights[li]
        fit, held = data[li][:n_fit], data[li][n_fit:]
        init = paper_selector(w, cfg.rank)
        tuned = _fit_layer(w, fit, cfg, cfg.seed + li)
        with torch.no_grad():
            before, after = float(_paper_loss(init, fit)), float(_paper_loss(tuned, fit))
        held_before, held_after = _paper_metrics(init, held, k), _paper_metrics(tuned, held, k)
        selectors[li] = tuned.factors
        rows.append({"layer": li, "rank": tuned.rank, "loss_before": before, "loss_after": after,
                     "recall_svd": held_before["recall"], "recall": held_after["recall"],
                     "spearman_svd": held_before["spearman"], "spearman": held_after["spearman"]})  # fmt: skip
        data[li] = []  # free the layer's inputs
    card = {
        "kind": "paper", "settings": asdict(cfg), "k_measured": k, "pairs": {"fit": n_fit, "heldout": n_held},
        "model": {"family": adapter.family, "path": str(adapter.path), "hidden": dims.hidden, "layers": dims.layers},
        "mean_recall": sum(r["recall"] for r in rows) / len(rows),
        "mean_recall_svd": sum(r["recall_svd"] for r in rows) / len(rows),
        "mean_spearman": sum(r["spearman"] for r in rows) / len(rows),
        "mean_spearman_svd": sum(r["spearman_svd"] for r in rows) / len(rows),
        "layers": rows,
    }  # fmt: skip
    return selectors, card


def format_paper_card(card: dict[str, Any]) -> str:
    """Per-layer fit loss and held-out recall@k / Spearman, SVD initialisation -> tuned."""
    lines = [f"layer  rank  loss before -> after  recall@{card['k_measured']} svd -> tuned  spearman svd -> tuned"]
    for r in card["layers"]:
        lines.append(f"{r['layer']:>5}  {r['rank']:>4}  {r['loss_before']:>11.4f} -> {r['loss_after']:<8.4f} "
                     f"{r['recall_svd']:>10.3f} -> {r['recall']:<6.3f} {r['spearman_svd']:>12.3f} -> "
                     f"{r['spearman']:.3f}")  # fmt: skip
    lines.append(f"mean held-out recall: SVD {card['mean_recall_svd']:.3f}, tuned {card['mean_recall']:.3f}; "
                 f"Spearman: SVD {card['mean_spearman_svd']:.3f}, tuned {card['mean_spearman']:.3f} "
                 f"({card['pairs']['fit']} fit / {card['pairs']['heldout']} held-out pairs)")  # fmt: skip
    return "\n".join(lines)
