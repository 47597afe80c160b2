"""Explicit attention rows for in-LLM methods, recomputed outside the fused kernel.

In-LLM methods need a few rows of a layer's attention (FastV: the last prompt token's; ALVTS'
calibration: the instruction tokens') while the model itself runs fused SDPA. These functions rebuild
those rows from the layer's own projection weights, so the model's attention kernel never has to
materialise probabilities. Pure tensor code: the caller passes weights and RoPE tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class QkWeights:
    """A layer's query/key projections: ``q = x @ q_weight.T + q_bias`` (heads * head_dim outputs)."""

    q_weight: Tensor  # (H * hd, d)
    k_weight: Tensor  # (H_kv * hd, d)
    q_bias: Tensor | None
    k_bias: Tensor | None
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, attn: torch.nn.Module, heads: int, kv_heads: int) -> QkWeights:
        """From a transformers attention module (LLaMA, Qwen2 and Qwen2.5-VL layouts)."""
        q, k = attn.q_proj, attn.k_proj
        head_dim = q.weight.shape[0] // heads
        return cls(q.weight, k.weight, q.bias, k.bias, heads, kv_heads, head_dim)

    def per_head(self) -> tuple[Tensor, Tensor]:
        """(H, hd, d) query weights and (H, hd, d) key weights, key heads repeated for GQA."""
        wq = self.q_weight.float().view(self.heads, self.head_dim, -1)
        wk = self.k_weight.float().view(self.kv_heads, self.head_dim, -1)
        return wq, wk.repeat_interleave(self.heads // self.kv_heads, dim=0)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding as LLaMA/Qwen2 apply it: x (..., H, n, hd), cos/sin (..., n, hd)."""
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # broadcast over heads
    return x * cos + rotate_half(x) * sin


def attention_rows(
    w: QkWeights, x_q: Tensor, x_k: Tensor, rope_q: tuple[Tensor, Tensor], rope_k: tuple[Tensor, Tensor],
    pos_q: Tensor, pos_k: Tensor,
) -> Tensor:
    """Softmax attention probabilities of a few query rows over all keys, per head.

    Args:
        w: the layer's projections.
        x_q: (..., n_q, d) normalised hidden states of the query rows (leading batch dims optional).
        x_k: (..., n_k, d) normalised hidden states of every key row.
        rope_q, rope_k: (cos, sin) tables, (..., n_q, hd) and (..., n_k, hd).
        pos_q, pos_k: (n_q,) and (n_k,) 1-D positions for the causal rule (key pos <= query pos).

    Returns:
        (..., H, n_q, n_k) float32 probabilities; each row sums to 1 over its visible keys.
    """
    q = _project(x_q, w.q_weight, w.q_bias, w.heads, w.head_dim)
    k = _project(x_k, w.k_weight, w.k_bias, w.kv_heads, w.head_dim)
    q, k = apply_rope(q, *(t.float() for t in rope_q)), apply_rope(k, *(t.float() for t in rope_k))
    k = k.repeat_interleave(w.heads // w.kv_heads, dim=-3)
    logits = q @ k.transpose(-1, -2) / w.head_dim**0.5  # (..., H, n_q, n_k)
    visible = pos_k[None, :] <= pos_q[:, None]
    return logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)


def visual_importance(
    w: QkWeights, x: Tensor, rope: tuple[Tensor, Tensor], query: Tensor, visual: Tensor, keys: Tensor | None = None
) -> Tensor:
    """Attention the ``query`` rows pay each ``visual`` row, averaged over heads and queries (RoPE, causal).

    Args:
        w: the layer's projections.
        x: (n, d) normalised hidden states of every row.
        rope: (1, n, hd) cos, sin tables of every row.
        query, visual: row indices.
        keys: rows the softmax runs over (ascending, holding ``visual``); None for every row.

    Returns:
        (N_v,) float32 importance.
    """
    cos, sin = rope[0][0], rope[1][0]
    keys = torch.arange(x.shape[0]) if keys is None else keys
    probs = attention_rows(w, x[query], x[keys], (cos[query], sin[query]), (cos[keys], sin[keys]), query, keys)
    return probs.mean(dim=(0, 1))[torch.isin(keys, visual)]


def _project(x: Tensor, weight: Tensor, bias: Tensor | None, heads: int, head_dim: int) -> Tensor:
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.view(*x.shape[:-1], heads, head_dim).transpose(-2, -3)  # (..., heads, n, hd)
