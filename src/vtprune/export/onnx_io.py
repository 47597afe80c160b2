"""Shared ONNX export plumbing: dynamo export with the vtprune translations, function bodies, checks,
atomic save, and an IO description a runtime can read."""

from __future__ import annotations

import contextlib
import gc
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vtprune.errors import ExportError

# Tensor bytes above which a graph's weights go into ``<graph>.onnx.data`` beside it: one protobuf message
# cannot exceed 2 GiB, and above 1 GB the exporter streams them to the file instead of building an in-memory
# protobuf copy first (a real-size vision tower in fp16 is 0.6-1.5 GB).
EXTERNAL_ABOVE = 1_000_000_000


def data_file(path: Path) -> str:
    """The external-data file name of graph ``path`` (``vision.onnx`` -> ``vision.onnx.data``)."""
    return Path(path).name + ".data"


def tensor_bytes(model: Any) -> int:
    """Bytes of the tensors a model holds inline (initializers and constant attributes)."""
    total = sum(t.ByteSize() for t in model.graph.initializer)
    for node in model.graph.node:
        total += sum(a.t.ByteSize() for a in node.attribute if a.HasField("t"))
    return total


@contextlib.contextmanager
def written_aside(path: Path) -> Iterator[Path]:
    """A temp dir beside graph ``path`` to save it (and its data file) into. When the block ends without an
    error, the other files are moved into place first and the graph last, so a failure never leaves a
    half-written graph; the temp dir is removed either way."""
    import os
    import shutil
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        for name in sorted(f.name for f in tmp.iterdir() if f.name != path.name):
            os.replace(tmp / name, path.parent / name)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_graph(model: Any, path: Path, external: bool = False) -> list[str]:
    """Save ``model`` at ``path`` atomically (a temp dir beside it; the data file moved in first, the
    ``.onnx`` last), with its tensors in ``data_file(path)`` when ``external`` or above ``EXTERNAL_ABOVE``;
    returns the file names written. A data file left by an earlier save to the same path is removed."""
    import onnx

    path = Path(path)
    if not external and tensor_bytes(model) <= EXTERNAL_ABOVE:
        save_atomic(model, path)
        (path.parent / data_file(path)).unlink(missing_ok=True)
        return [path.name]
    with written_aside(path) as tmp:
        # Tensors under 1 KB (shapes, axes, scalars) stay inline: shape inference reads them.
        onnx.save_model(model, str(tmp / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file(path), size_threshold=1024)  # fmt: skip
    return [path.name, data_file(path)]


def program_tensor_bytes(program: Any) -> int:
    """Bytes of an exported program's initializers, without serializing them."""
    values = program.model.graph.initializers.values()
    return sum(v.const_value.nbytes for v in values if v.const_value is not None)


def save_program_streamed(program: Any, path: Path) -> list[str]:
    """Save an exported program with its weights streamed into ``data_file(path)`` (tensors of 1 KB and up;
    no in-memory protobuf of the weights), then attach the vtprune function bodies to the graph file; both
    written aside and moved in (data first). Returns the file names."""
    import onnx
    import onnx_ir

    from vtprune.export.ops.onnx_defs import attach_functions

    path = Path(path)
    with written_aside(path) as tmp:
        onnx_ir.save(program.model, tmp / path.name, external_data=data_file(path), size_threshold_bytes=1024)
        graph = attach_functions(onnx.load(str(tmp / path.name), load_external_data=False))
        onnx.save_model(graph, str(tmp / path.name))
    return [path.name, data_file(path)]


def externalize(path: Path) -> list[str]:
    """Rewrite the saved graph ``path`` with every tensor in ``data_file(path)`` (``--external-data``); a
    graph that already keeps its weights outside is left as it is. Returns its files."""
    import onnx

    locations = external_locations(onnx.load(str(path), load_external_data=False))
    if locations:
        return [path.name, *locations]
    return save_graph(onnx.load(str(path)), path, external=True)


def export_module(
    module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict, opset: int
) -> dict[str, Any]:
    """Export ``module(*args)`` with the dynamo exporter, attach vtprune function bodies, check, save
    (weights beside the graph above ``EXTERNAL_ABOVE``); the IO description holds the files written."""
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
    if program_tensor_bytes(program) > EXTERNAL_ABOVE:
        files = save_program_streamed(program, path)
        del program
        gc.collect()
        onnx.checker.check_model(str(path), full_check=True)  # by path: reads the data file
        return describe(onnx.load(str(path), load_external_data=False)) | {"files": files}
    model = attach_functions(program.model_proto)
    del program
    # Saved first, then checked from the file: one in-memory copy of the weights at a time (a real-size
    # vision tower is GBs); the bundle is written aside, so a graph that fails the check is never kept.
    files = save_graph(model, path)
    spec = describe(model) | {"files": files}
    del model
    gc.collect()
    onnx.checker.check_model(str(path), full_check=True)  # by path: works above 2 GB too
    return spec


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
