"""The package layering: every import (module-level or inside a function) points down or sideways in
``LAYERS``, and the graph of packages has no cycle. Adding a package means placing it here."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vtprune"

# Lowest first. A unit is a top-level module or package of vtprune.
LAYERS = [
    # leaves: the bundle format, output writing, the method registry, configuration, errors, images, CLI
    # argument types
    {"__init__", "errors", "methods", "config", "files", "outputs", "manifest", "images", "cliargs"},
    {"prune"},  # pruning math as tensor functions (and the calibrated factors' file format)
    {"flops"},
    {"models"},  # family adapters
    {"runtime"},  # the generation loop, its runner contract, the PyTorch reference pipeline and routers
    {"export"},  # ONNX graph writers and weight quantization
    {"backends"},  # ONNX Runtime and TensorRT runners over bundles; engine builds
    {"check"},  # parity: bundles against PyTorch, engines against ONNX Runtime
    {"api"},  # whole jobs for the library: export a validated bundle, open a runner
    {"bench", "calib", "eval", "demo"},
    {"cli"},
]
LEVEL = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> list[tuple[str, str, str]]:
    """(importing unit, imported unit, where) for every vtprune import in the source tree."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        here = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else "__init__"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vtprune":
                targets = [f"vtprune.{a.name}" for a in node.names] if node.module == "vtprune" else [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "vtprune"]
            else:
                continue
            for target in targets:
                unit = unit_of(target)
                if unit == "__version__":
                    unit = "__init__"
                if unit != here:
                    found.append((here, unit, f"{rel}:{node.lineno}"))
    return found


def test_every_unit_has_a_layer():
    units = {p.stem for p in SRC.glob("*.py")} | {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert units - set(LEVEL) == set(), "place new packages in LAYERS"


def test_imports_only_point_down_or_sideways():
    upward = [f"{where}: {src} imports {dst}" for src, dst, where in imports() if LEVEL[dst] > LEVEL[src]]
    assert upward == []


def test_no_import_cycle_between_packages():
    graph = defaultdict(set)
    for src, dst, _ in imports():
        graph[src].add(dst)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
