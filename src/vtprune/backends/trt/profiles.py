"""Optimization profiles for a bundle's graphs, derived from the symbolic dims the exporter wrote."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ProfileLimits:
    """Ranges (min, opt, max) per kind of symbolic dimension."""

    batch: tuple[int, int, int] = (1, 1, 1)
    sequence: tuple[int, int, int] = (1, 64, 1024)  # new tokens per decoder call (prefill up to max)
    past: tuple[int, int, int] = (0, 256, 1024)  # KV-cache length (each layer's own in decode graphs)
    visual: tuple[int, int, int] | None = None  # visual rows of a routed prefill (default: ``sequence``)
    merged: tuple[int, int, int] = (1, 256, 1280)  # merged tokens of a native-resolution vision graph (Qwen2.5-VL)

    def dim(self, name: str, which: int) -> int:
        factor, _, base = name.partition("*")
        if base and factor.isdigit():  # "4*merged_tokens": patches of a native-resolution vision graph
            return int(factor) * self.dim(base, which)
        if name.startswith("merged_tokens"):
            return self.merged[which]
        if name.startswith("windows_plus_one"):  # attention windows + 1: at most one window per merged token
            return (2, min(17, self.merged[2] + 1), self.merged[2] + 1)[which]
        if "+" in name or name.startswith("total"):
            return self.sequence[which] + self.past[which]
        if name.startswith("past"):
            return self.past[which]
        if name.startswith("visual_length"):
            return (self.visual or self.sequence)[which]
        if name.startswith(("sequence", "text_length", "query_length")):
            return self.sequence[which]
        return self.batch[which]  # batch_size and exporter-named batch dims (s0, s1, ...)


def profiles_from_onnx(path: str | Path, limits: ProfileLimits | None = None) -> dict[str, tuple[Shape, Shape, Shape]]:
    """A (min, opt, max) shape triple for every graph input with a symbolic dimension."""
    import onnx

    limits = limits or ProfileLimits()
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for inp in model.graph.input:
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        if all(isinstance(d, int) for d in dims):
            continue
        out[inp.name] = tuple(
            tuple(d if isinstance(d, int) else limits.dim(d, which) for d in dims) for which in range(3)
        )
    return out
