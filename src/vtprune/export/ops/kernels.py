"""Fused GPU kernels of the pruning ops (Triton): the plugin face of GraphPropagate and TopKRoute.

The kernels compute what ``vtprune.prune.gprune.scores`` and ``keep_topk`` + ``gather_tokens`` compute:

- ``_unit_rows``: fp32 L2 norm of each token, unit rows ``u = x / max(norm, tiny)`` and ``s0 = norm * valid``.
- the cosines ``u @ u.T``: the device's own GEMM (``torch.bmm``, cuBLAS on CUDA) in full fp32 (TF32
  would move cosines across the threshold). A Triton IEEE-fp32 tile kernel measured 2.5-8.8x slower than
  cuBLAS on an H100 (benchmarks/results/gpu/similarity_tiles_h100.json).
- ``_mask_softmax``: one program per row: the edge mask (self-loops, pads), the degree (the row count of
  the mask; the mask is symmetric up to the GEMM's rounding, the reference counts columns), the masked
  logits ``sim / tau`` and their softmax, written in place as a row of the transition matrix ``P``.
- ``_propagate``: one ``s <- s P`` step; the last one divides by the degree and masks pads to -inf.
- ``_topk_flags`` + ``_compact``: the rank of every score (ties: lower index first, as ONNX TopK) marks
  the kept tokens; an exclusive prefix sum writes their indices in ascending order.
- ``_gather_rows``: kept tokens, any dtype.

The launchers take preallocated outputs and a workspace so a TensorRT plugin can pass its own buffers
(``workspace_layout`` / ``topk_workspace_bytes`` say how big). The same kernels run natively on CUDA
tensors and, when Triton was imported with ``TRITON_INTERPRET=1``, in its interpreter on CPU tensors
(how the CPU tests check them against the reference).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from vtprune.prune.gprune import _MASKED_LOGIT

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # callers import this module lazily and report the missing extra
    from vtprune.errors import BackendUnavailableError

    hint = f"the fused pruning kernels need Triton: pip install 'vtprune[gpu]' ({exc})"
    raise BackendUnavailableError(hint) from None

TINY = torch.finfo(torch.float32).tiny
BLOCK_ROWS = 32  # propagate and top-k tiles
BLOCK_SOFTMAX = 1024
BLOCK_D = 256  # row norms and gathers
ALIGN = 256  # bytes; each workspace buffer starts on this boundary


# --- kernels ----------------------------------------------------------------------------------
@triton.jit
def _unit_rows(x_ptr, valid_ptr, u_ptr, norm_ptr, s0_ptr, D: tl.constexpr, tiny, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], tl.float32)
    for d0 in range(0, D, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * D + offs, mask=offs < D, other=0.0).to(tl.float32)
        acc += v * v
    norm = tl.sqrt(tl.sum(acc, 0))
    safe = tl.maximum(norm, tiny)
    for d0 in range(0, D, BLOCK):
        offs = d0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * D + offs, mask=offs < D, other=0.0).to(tl.float32)
        tl.store(u_ptr + row * D + offs, v / safe, mask=offs < D)
    valid = tl.load(valid_ptr + row).to(tl.float32)
    tl.store(norm_ptr + row, norm)
    tl.store(s0_ptr + row, norm * valid)


@triton.jit
def _row_logits(base, valid_ptr, b, i, vi, n0, N: tl.constexpr, theta, tau, masked, BLOCK: tl.constexpr):
    """One block of row i's masked logits: (logits, -inf past N), the edge mask (False past N)."""
    cols = n0 + tl.arange(0, BLOCK)
    inside = cols < N
    sim = tl.load(base + cols, mask=inside, other=0.0)
    vj = tl.load(valid_ptr + b * N + cols, mask=inside, other=0) != 0
    edge = (((sim >= theta) & vi & vj) | (cols == i)) & inside
    return tl.where(inside, tl.where(edge, sim / tau, masked), float("-inf")), edge


@triton.jit
def _mask_softmax(z_ptr, valid_ptr, deg_ptr, N: tl.constexpr, theta, tau, masked, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * N + i: a row of cosines becomes a row of P, in place
    b, i = row // N, row % N
    base = z_ptr + row * N
    vi = tl.load(valid_ptr + row) != 0
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    count = tl.zeros([BLOCK], tl.float32)
    for n0 in range(0, N, BLOCK):
        z, edge = _row_logits(base, valid_ptr, b, i, vi, n0, N, theta, tau, masked, BLOCK)
        m = tl.maximum(m, z)
        count += edge.to(tl.float32)
    mx = tl.max(m, 0)
    acc = tl.zeros([BLOCK], tl.float32)
    for n0 in range(0, N, BLOCK):
        z, _ = _row_logits(base, valid_ptr, b, i, vi, n0, N, theta, tau, masked, BLOCK)
        acc += tl.exp(z - mx)  # exp(-inf) = 0 past N
    total = tl.sum(acc, 0)
    for n0 in range(0, N, BLOCK):  # the softmax is written over the cosines it was computed from
        z, _ = _row_logits(base, valid_ptr, b, i, vi, n0, N, theta, tau, masked, BLOCK)
        cols = n0 + tl.arange(0, BLOCK)
        tl.store(base + cols, tl.exp(z - mx) / total, mask=cols < N)
    tl.store(deg_ptr + row, tl.sum(count, 0))


@triton.jit
def _propagate(s_ptr, p_ptr, out_ptr, deg_ptr, valid_ptr, N: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    acc = tl.zeros([BLOCK], tl.float32)
    for i0 in range(0, N, BLOCK):
        ii = i0 + tl.arange(0, BLOCK)
        imask = ii < N
        s = tl.load(s_ptr + b * N + ii, mask=imask, other=0.0)
        p = tl.load(p_ptr + b * N * N + ii[:, None] * N + cols[None, :], mask=imask[:, None] & cmask[None, :],
                    other=0.0)  # fmt: skip
        acc += tl.sum(s[:, None] * p, 0)
    if FINAL:
        deg = tl.load(deg_ptr + b * N + cols, mask=cmask, other=1.0)
        valid = tl.load(valid_ptr + b * N + cols, mask=cmask, other=0) != 0
        acc = tl.where(valid, acc / deg, float("-inf"))
    tl.store(out_ptr + b * N + cols, acc, mask=cmask)

@triton.jit
def _topk_flags(s_ptr, keep_ptr, N: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    ii = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    imask = ii < N
    si = tl.load(s_ptr + b * N + ii, mask=imask, other=float("-inf"))
    rank = tl.zeros([BLOCK], tl.int32)
    for j0 in range(0, N, BLOCK):
        jj = j0 + tl.arange(0, BLOCK)
        sj = tl.load(s_ptr + b * N + jj, mask=jj < N, other=float("-inf"))
        beats = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (jj[None, :] < ii[:, None]))
        rank += tl.sum((beats & (jj < N)[None, :]).to(tl.int32), 1)
    tl.store(keep_ptr + b * N + ii, (rank < K).to(tl.int32), mask=imask)


@triton.jit
def _compact(keep_ptr, idx_ptr, N: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offset = tl.full([], 0, tl.int32)
    for i0 in range(0, N, BLOCK):
        ii = i0 + tl.arange(0, BLOCK)
        keep = tl.load(keep_ptr + b * N + ii, mask=ii < N, other=0)
        pos = tl.cumsum(keep, 0) - keep + offset
        tl.store(idx_ptr + b * K + pos, ii.to(tl.int64), mask=keep != 0)
        offset += tl.sum(keep, 0)


@triton.jit
def _gather_rows(x_ptr, idx_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # b * K + kept row
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    src = tl.load(idx_ptr + r)
    row = (r // K) * N + src
    v = tl.load(x_ptr + row * D + offs, mask=offs < D)
    tl.store(out_ptr + r * D + offs, v, mask=offs < D)


@dataclass(frozen=True)
class Workspace:
    """Byte offsets of GraphPropagate's scratch buffers in one workspace (all fp32)."""

    u: int  # (B, N, D) unit rows
    p: int  # (B, N, N) logits, then the transition matrix
    norm: int  # (B, N)
    s: tuple[int, int]  # (B, N) ping-pong propagation vectors
    deg: int  # (B, N)
    size: int  # total bytes


def workspace_layout(b: int, n: int, d: int) -> Workspace:
    """Where each scratch buffer of ``graph_propagate`` starts in a workspace for (B, N, D) tokens."""
    sizes = [b * n * d, b * n * n, b * n, b * n, b * n, b * n]
    offsets, at = [], 0
    for count in sizes:
        offsets.append(at)
        at += -(-count * 4 // ALIGN) * ALIGN
    return Workspace(offsets[0], offsets[1], offsets[2], (offsets[3], offsets[4]), offsets[5], at)


def _view(ws: Tensor, offset: int, shape: tuple[int, ...]) -> Tensor:
    count = 1
    for dim in shape:
        count *= dim
    return ws[offset : offset + 4 * count].view(torch.float32).view(shape)


@contextmanager
def _fp32_matmul() -> Iterator[None]:
    """Full-fp32 GEMMs whatever the process chose: TF32 would move cosines across the threshold."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _check_devices(*tensors: Tensor) -> None:
    devices = {t.device.type for t in tensors}
    if devices == {"cpu"} and not triton.knobs.runtime.interpret:
        raise ValueError("the pruning kernels run on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)")
    if devices not in ({"cuda"}, {"cpu"}):
        raise ValueError(f"the pruning kernels need all tensors on one CUDA device; got {sorted(devices)}")


def graph_propagate(
    x: Tensor, valid: Tensor, theta: float, tau: float, iters: int,
    out: Tensor | None = None, workspace: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """G-Prune scores with the fused kernels: (B, N, D) any float, (B, N) bool -> (B, N) fp32.

    ``workspace`` is a uint8 tensor of at least ``workspace_layout(B, N, D).size`` bytes (allocated when
    omitted). Launches on the current stream.
    """
    b, n, d = x.shape
    _check_devices(x, valid)
    x, valid = x.contiguous(), valid.contiguous()
    lay = workspace_layout(b, n, d)
    ws = workspace if workspace is not None else torch.empty(lay.size, dtype=torch.uint8, device=x.device)
    u, p = _view(ws, lay.u, (b, n, d)), _view(ws, lay.p, (b, n, n))
    norm, deg = _view(ws, lay.norm, (b, n)), _view(ws, lay.deg, (b, n))
    s = [_view(ws, off, (b, n)) for off in lay.s]
    out = out if out is not None else torch.empty((b, n), dtype=torch.float32, device=x.device)
    _unit_rows[(b * n,)](x, valid, u, norm, s[0], d, TINY, BLOCK=BLOCK_D)
    with _fp32_matmul():
        torch.bmm(u, u.transpose(1, 2), out=p)  # cosines: the device's GEMM (cuBLAS), full fp32
    _mask_softmax[(b * n,)](p, valid, deg, n, float(theta), float(tau), _MASKED_LOGIT,
                            BLOCK=min(BLOCK_SOFTMAX, triton.next_power_of_2(n)))  # fmt: skip
    grid = (b, -(-n // BLOCK_ROWS))
    if iters == 0:
        torch.where(valid, s[0] / deg, torch.full_like(deg, float("-inf")), out=out)
        return out
    for t in range(iters):
        last = t == iters - 1
        _propagate[grid](s[t % 2], p, out if last else s[(t + 1) % 2], deg, valid, n, FINAL=last, BLOCK=BLOCK_ROWS)
    return out


def topk_workspace_bytes(b: int, n: int) -> int:
    """Scratch bytes of ``topk_route`` for (B, N) scores: one int32 kept flag per token."""
    return -(-b * n * 4 // ALIGN) * ALIGN


def topk_route(
    x: Tensor, scores: Tensor, k: int, tokens: Tensor | None = None, indices: Tensor | None = None,
    workspace: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Top-k with the fused kernels: (B, N, D), (B, N) fp32 -> (B, k, D) kept tokens, (B, k) int64 ascending.

    ``workspace``: a uint8 tensor of at least ``topk_workspace_bytes(B, N)`` bytes (allocated when omitted).
    """
    b, n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    _check_devices(x, scores)
    x, scores = x.contiguous(), scores.contiguous()
    indices = indices if indices is not None else torch.empty((b, k), dtype=torch.int64, device=x.device)
    tokens = tokens if tokens is not None else torch.empty((b, k, d), dtype=x.dtype, device=x.device)
    ws = workspace if workspace is not None else torch.empty(topk_workspace_bytes(b, n), dtype=torch.uint8,
                                                             device=x.device)  # fmt: skip
    keep = ws[: b * n * 4].view(torch.int32).view(b, n)
    _topk_flags[(b, -(-n // BLOCK_ROWS))](scores, keep, n, k, BLOCK=BLOCK_ROWS)
    _compact[(b,)](keep, indices, n, k, BLOCK=BLOCK_SOFTMAX)
    _gather_rows[(b * k, -(-d // BLOCK_D))](x, indices, tokens, n, k, d, BLOCK=BLOCK_D)
    return tokens, indices
