"""Weights that already sit on a block-quantized grid, written back onto it exactly.

Checkpoints converted from llama.cpp's GGUF files (the pocket VLM's language model is SmolLM2-135M from a
``Q4_1`` file, its embedding ``Q8_0``) hold dequantized weights: in every block of 32 along the input
dimension, each weight is ``m + d * q`` with q in 0..15 (Q4_1) or ``d * q`` with q in -127..127 (Q8_0).
Round-to-nearest int4 onto a new grid (``quantize_graph``'s symmetric blocks) moves every such weight by up
to half a step a second time: on the pocket, the next-token distribution moved by about 1 nat and easy-vqa
accuracy fell from 0.98 to 0.64. Written onto their own grid they are exact:

- 4-bit affine blocks: ``MatMulNBits`` (symmetric form, ``d * (q - 8)``, ONNX Runtime's fast int8-dot
  kernels) plus the block offsets ``m + 8 d`` times each block's input sum: the block sums are one MatMul
  with a 0/1 block indicator (shared by the MatMuls reading the same input), the offsets one small MatMul
  over them. ``MatMulNBits`` with float zero points would be exact in one node, but ONNX Runtime's CPU
  kernels dequantize those to fp32 on every call (1.5 ms instead of 51 us for a 576 x 1536 decode step,
  2-core Xeon). The ``qdq`` form writes the same codes as blocked ``DequantizeLinear`` for TensorRT.
- 8-bit symmetric blocks: ``MatMulNBits`` with 8 bits, ``d * (q - 128)``.

``grid_of`` finds the grid of one weight (or None); ``quantize_on_grid`` rewrites every constant-weight
MatMul of a graph whose weight has one, and leaves the others for the usual quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

BLOCK = 32  # the GGUF block along the input dimension (Q4_0, Q4_1, Q8_0)
TOLERANCE = 1e-3  # of a grid step: how far a weight may sit from its grid point (fp16 scales stored as fp32)
ON_GRID = 0.99  # the share of blocks that must be exact for a weight to be written on its grid


@dataclass(frozen=True)
class Grid:
    """Rows ``(R, C)`` as ``offset + scale * q`` per block of ``BLOCK`` columns: q ``(R, C / BLOCK, BLOCK)``
    unsigned codes, scale and offset ``(R, C / BLOCK)``; ``bits`` 4 (codes 0..15) or 8 (codes 0..255).
    A MatMul weight ``(K, N)`` is read as its transpose (blocks along K), an embedding table as is."""

    bits: int
    q: np.ndarray
    scale: np.ndarray
    offset: np.ndarray

    def dequantized(self) -> np.ndarray:
        """The rows ``(R, C)`` the grid holds."""
        w = self.offset[..., None] + self.scale[..., None] * self.q.astype(np.float64)
        return w.reshape(w.shape[0], -1).astype(np.float32)


def grid_of(rows: np.ndarray) -> Grid | None:
    """The grid ``rows (R, C)`` sits on, blocks of ``BLOCK`` along C: 4-bit affine blocks, else 8-bit symmetric
    blocks, when at least ``ON_GRID`` of the blocks are on it (the others, e.g. an embedding row added to a
    GGUF model's vocabulary, are rounded to the nearest point of the same form); else None."""
    r, c = rows.shape
    if c % BLOCK or rows.dtype != np.float32:
        return None
    blocks = rows.reshape(r, c // BLOCK, BLOCK).astype(np.float64)
    lo, hi = blocks.min(-1), blocks.max(-1)
    step = (hi - lo) / 15
    q = np.clip(np.round((blocks - lo[..., None]) / np.where(step > 0, step, 1.0)[..., None]), 0, 15)
    if _on_grid(blocks, lo[..., None] + q * step[..., None], step):
        return Grid(4, q.astype(np.uint8), step, lo)
    step = np.abs(blocks).max(-1) / 127
    q = np.clip(np.round(blocks / np.where(step > 0, step, 1.0)[..., None]), -127, 127)
    if _on_grid(blocks, q * step[..., None], step):
        return Grid(8, (q + 128).astype(np.uint8), step, -128 * step)
    return None


def _on_grid(blocks: np.ndarray, rebuilt: np.ndarray, step: np.ndarray) -> bool:
    exact = np.all(np.abs(rebuilt - blocks) <= TOLERANCE * np.maximum(step, 1e-30)[..., None], axis=-1)
    return bool(exact.mean() >= ON_GRID)


def quantize_on_grid(
    model: Any, accuracy_level: int | None, exclude: set[str] = frozenset(), form: str = "ort"
) -> tuple[Any, dict[str, Any]]:
    """Rewrite each constant-weight MatMul (and, in the ``ort`` form, embedding Gather) of ``model`` whose
    weight sits on a grid (``grid_of``) exactly, in place, except the nodes named in ``exclude``; returns
    the model and a record: how many nodes took each form, and the block-sum and block-offset MatMuls, which
    stay fp32 (``fp32_matmuls``). ``form``: ``ort`` (``MatMulNBits``, ``GatherBlockQuantized``) or ``qdq`` (blocked
    ``DequantizeLinear`` of int4 / int8 codes before the MatMul: TensorRT's weight-only form, opset 21)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    block_sums: dict[str, str] = {}
    counts: dict[str, Any] = {"int4_affine": 0, "int8": 0, "fp32_matmuls": []}
    nodes = []
    for node in graph.node:
        if node.name in exclude:
            nodes.append(node)
            continue
        if form == "ort" and node.op_type == "Gather" and node.input[0] in inits and uses[node.input[0]] == 1:
            nodes.append(_gather(graph, node, inits, counts))
            continue
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        weight = weight if weight is not None and uses[weight.name] == 1 else None  # shared weights: left as is
        grid = None if weight is None or len(weight.dims) != 2 else grid_of(numpy_helper.to_array(weight).T)
        if grid is None:
            nodes.append(node)
            continue
        k, n = weight.dims
        stem = node.name or node.output[0]
        product = node.output[0] if grid.bits == 8 else f"{stem}.blocks_out"
        if form == "ort":
            graph.initializer.extend([numpy_helper.from_array(_packed(grid), f"{stem}.q"),
                                      numpy_helper.from_array(grid.scale.astype(np.float32).reshape(-1),
                                                              f"{stem}.scales")])  # fmt: skip
            new = helper.make_node("MatMulNBits", [node.input[0], f"{stem}.q", f"{stem}.scales"], [product],
                                   name=f"{stem}/MatMulNBits", domain="com.microsoft", K=k, N=n, bits=grid.bits,
                                   block_size=BLOCK, accuracy_level=accuracy_level)  # fmt: skip
            new.metadata_props.extend(node.metadata_props)
            nodes.append(new)
        else:  # Q/DQ: signed codes (q - 8 or q - 128) per block of 32 along K, as TensorRT reads them
            graph.initializer.extend([_signed_tensor(grid, f"{stem}.q"),
                                      numpy_helper.from_array(grid.scale.T.astype(np.float32), f"{stem}.scales")])
            dq = helper.make_node("DequantizeLinear", [f"{stem}.q", f"{stem}.scales"], [f"{stem}.weight"],
                                  name=f"{stem}/DequantizeLinear", axis=0, block_size=BLOCK)  # fmt: skip
            mm = helper.make_node("MatMul", [node.input[0], f"{stem}.weight"], [product], name=node.name)
            mm.metadata_props.extend(node.metadata_props)
            nodes.extend([dq, mm])
        counts["int4_affine" if grid.bits == 4 else "int8"] += 1
        if grid.bits == 4:  # + (m + 8 d) . block sums of the input
            sums = block_sums.get(node.input[0])
            if sums is None:  # x @ E: E (K, K / BLOCK) sums each block (one node, any rank of x)
                sums = block_sums[node.input[0]] = f"{node.input[0]}.block_sums"
                indicator = f"grid.block_indicator.{k}"
                if indicator not in inits:
                    eye = np.repeat(np.eye(k // BLOCK, dtype=np.float32), BLOCK, axis=0)
                    inits[indicator] = numpy_helper.from_array(eye, indicator)
                    graph.initializer.append(inits[indicator])
                nodes.append(helper.make_node("MatMul", [node.input[0], indicator], [sums], name=f"{sums}/MatMul"))
                counts["fp32_matmuls"].append(f"{sums}/MatMul")
            offsets = (grid.offset + 8 * grid.scale).T.astype(np.float32)  # (K / BLOCK, N)
            graph.initializer.append(numpy_helper.from_array(offsets, f"{stem}.offsets"))
            nodes.append(helper.make_node("MatMul", [sums, f"{stem}.offsets"], [f"{stem}.offsets_out"],
                                          name=f"{stem}/offsets"))  # fmt: skip
            counts["fp32_matmuls"].append(f"{stem}/offsets")
            nodes.append(helper.make_node("Add", [product, f"{stem}.offsets_out"], [node.output[0]],
                                          name=f"{stem}/Add"))  # fmt: skip
        graph.initializer.remove(weight)
        del inits[weight.name]
    del graph.node[:]
    graph.node.extend(nodes)
    if form == "ort" and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    if form == "qdq" and (counts["int4_affine"] or counts["int8"]):
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, 21)  # blocked DequantizeLinear and int4 tensors
    return model, counts


def _gather(graph: Any, node: Any, inits: dict[str, Any], counts: dict[str, int]) -> Any:
    """An embedding ``Gather`` whose table sits on the 8-bit grid as ``GatherBlockQuantized`` (else as is)."""
    from onnx import helper, numpy_helper

    table = inits[node.input[0]]
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    grid = grid_of(numpy_helper.to_array(table)) if len(table.dims) == 2 and axis == 0 else None
    if grid is None or grid.bits != 8:
        return node
    stem = node.name or node.output[0]
    graph.initializer.extend([numpy_helper.from_array(_packed(grid).reshape(table.dims), f"{stem}.q"),
                              numpy_helper.from_array(grid.scale.astype(np.float32), f"{stem}.scales")])  # fmt: skip
    graph.initializer.remove(table)
    del inits[table.name]
    counts["int8"] += 1
    out = helper.make_node("GatherBlockQuantized", [f"{stem}.q", node.input[1], f"{stem}.scales"], list(node.output),
                           name=f"{stem}/GatherBlockQuantized", domain="com.microsoft", bits=8, block_size=BLOCK,
                           gather_axis=0, quantize_axis=1)  # fmt: skip
    out.metadata_props.extend(node.metadata_props)
    return out


def _signed_tensor(grid: Grid, name: str) -> Any:
    """The codes as a signed ``(K, N)`` int4 / int8 ONNX tensor (two int4 values per byte, low nibble first)."""
    from onnx import TensorProto, helper

    signed = (grid.q.astype(np.int16) - (8 if grid.bits == 4 else 128)).reshape(grid.q.shape[0], -1).T  # (K, N)
    if grid.bits == 8:
        return helper.make_tensor(name, TensorProto.INT8, signed.shape, signed.astype(np.int8).tobytes(), raw=True)
    flat = (signed.reshape(-1) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return helper.make_tensor(name, TensorProto.INT4, signed.shape, (flat[0::2] | (flat[1::2] << 4)).tobytes(),
                              raw=True)  # fmt: skip


def _packed(grid: Grid) -> np.ndarray:
    """MatMulNBits' B: ``(N, K / BLOCK, BLOCK * bits / 8)`` uint8, two 4-bit codes per byte low nibble first."""
    if grid.bits == 8:
        return np.ascontiguousarray(grid.q)
    q = grid.q
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
