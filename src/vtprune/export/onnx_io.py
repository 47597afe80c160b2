"""Shared ONNX export plumbing: dynamo export with the vtprune translations, function bodies, checks,
atomic save, and an IO description a runtime can read."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch

from vtprune.errors import ExportError


def export_module(
    module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict, opset: int
) -> dict[str, Any]:
    """Export ``module(*args)`` with the dynamo exporter, attach vtprune function bodies, check, save."""
    import onnx

    from vtprune.export.ops.onnx_defs import attach_functions, translations

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
            program = torch.onnx.export(
                module.eval(), args, dynamo=True, opset_version=opset, input_names=inputs, output_names=outputs,
                dynamic_shapes=dynamic, custom_translation_table=translations(), external_data=False,
            )  # fmt: skip
    except Exception as exc:  # the exporter raises many types; surface one line, keep the cause
        raise ExportError(f"torch.onnx.export failed for {path.name}: {str(exc).splitlines()[0][:300]}") from exc
    model = attach_functions(program.model_proto)
    onnx.checker.check_model(model, full_check=True)
    save_atomic(model, path)
    return describe(model)


def save_atomic(model: Any, path: Path) -> None:
    """``model`` serialized into ``path`` through a temp file beside it (never half-written)."""
    from vtprune.outputs import write_file_atomic

    write_file_atomic(path, model.SerializeToString())


def describe(model: Any) -> dict[str, Any]:
    """Names, element types and (symbolic) shapes of a model's inputs and outputs."""
    import onnx

    def entry(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return {"inputs": [entry(v) for v in model.graph.input], "outputs": [entry(v) for v in model.graph.output]}


def external_locations(model: Any) -> list[str]:
    """The external-data file of every tensor in ``model`` stored outside it (initializers, attribute
    tensors, subgraphs and function bodies), in order of first use."""
    import onnx

    found: dict[str, None] = {}

    def tensors(graph: Any) -> Any:
        yield from graph.initializer
        for node in graph.node:
            yield from node_tensors(node)

    def node_tensors(node: Any) -> Any:
        for attr in node.attribute:
            yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from tensors(g)

    every = [*tensors(model.graph), *(t for f in model.functions for n in f.node for t in node_tensors(n))]
    for t in every:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found.setdefault(next((e.value for e in t.external_data if e.key == "location"), ""), None)
    return list(found)
