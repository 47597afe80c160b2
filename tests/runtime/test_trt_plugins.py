"""The TensorRT plugin face of the pruning ops, as far as it goes without a GPU.

TensorRT-RTX 1.7 (the TensorRT installable here) has no IPluginV3 layers, so a plugin build is refused
there with one line; what is checked instead: the plugin classes built on its Python bindings (fields,
shapes' types, formats, serialization), the ONNX the parser gets (function bodies removed so the vtprune
nodes go to the plugin lookup), and the launch path over raw pointers (tests/export/test_kernels.py).
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from vtprune.errors import ConfigError
from vtprune.export.ops import DOMAIN
from vtprune.export.ops import trt_plugins as tp

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX (pip install 'vtprune[trt]') is not installed")


def _fields(**values):
    kinds = {name: kind for op in tp.FIELDS.values() for name, kind in op}
    return trt.PluginFieldCollection([tp._field(trt, name, v, kinds[name]) for name, v in values.items()])


def _desc(dtype):
    return SimpleNamespace(desc=SimpleNamespace(format=trt.TensorFormat.LINEAR, type=dtype))


def test_creator_reads_the_node_attributes_and_the_plugin_serializes_them_back():
    _, creator_cls = tp._classes(trt)
    creator = creator_cls("GraphPropagate", "")
    assert [f.name for f in creator.field_names] == ["theta", "tau", "iters"]
    plugin = creator.create_plugin("gp", _fields(theta=0.5, tau=0.03, iters=5), trt.TensorRTPhase.BUILD)
    assert plugin.attrs == {"theta": 0.5, "tau": pytest.approx(0.03), "iters": 5}
    assert (plugin.plugin_name, plugin.plugin_version, plugin.num_outputs) == ("GraphPropagate", "1", 1)
    again = creator.create_plugin("gp2", plugin.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert again.attrs == plugin.attrs and plugin.clone().attrs == plugin.attrs
    with pytest.raises(ValueError, match="iters"):
        tp.parse_fields("GraphPropagate", {"theta": np.float32(0.5), "tau": np.float32(0.03)})


def test_plugin_types_and_formats():
    _, creator_cls = tp._classes(trt)
    dt = trt.DataType
    gp = creator_cls("GraphPropagate", "vtprune").create_plugin("gp", _fields(theta=0.5, tau=0.03, iters=2),
                                                                 trt.TensorRTPhase.BUILD)  # fmt: skip
    assert gp.plugin_namespace == "vtprune" and gp.get_output_data_types([dt.HALF, dt.BOOL]) == [dt.FLOAT]
    io = [_desc(dt.HALF), _desc(dt.BOOL), _desc(dt.FLOAT)]
    assert all(gp.supports_format_combination(i, io, 2) for i in range(3))
    assert not gp.supports_format_combination(0, [_desc(dt.INT32), *io[1:]], 2)
    assert not gp.supports_format_combination(1, [io[0], _desc(dt.FLOAT), io[2]], 2)
    route = creator_cls("TopKRoute", "").create_plugin("r", _fields(k=64), trt.TensorRTPhase.BUILD)
    assert route.num_outputs == 2 and route.get_output_data_types([dt.HALF, dt.FLOAT]) == [dt.HALF, dt.INT64]
    io = [_desc(dt.HALF), _desc(dt.FLOAT), _desc(dt.HALF), _desc(dt.INT64)]
    assert all(route.supports_format_combination(i, io, 2) for i in range(4))
    assert not route.supports_format_combination(2, [io[0], io[1], _desc(dt.FLOAT), io[3]], 2)  # tokens keep x's type
    assert tp.workspace_bytes("TopKRoute", (2, 576, 4096)) >= 2 * 576 * 4
    assert tp.workspace_bytes("GraphPropagate", (1, 576, 4096)) >= (576 * 4096 + 576 * 576) * 4


def test_tensorrt_rtx_has_no_plugin_layers_so_loading_is_refused():
    assert not tp.supports_plugins(trt)
    with pytest.raises(RuntimeError, match="no IPluginV3 layers"):
        tp.load_plugins(trt)


def test_the_parser_gets_the_vtprune_nodes_without_their_bodies(bundles, tmp_path):
    from vtprune.backends.trt.build import _capturing_logger, _parse_onnx, onnx_without_functions
    from vtprune.errors import OnnxParseError

    path = bundles["tiny-llava"] / "vision.onnx"
    original = onnx.load(str(path), load_external_data=False)
    stripped = onnx.load_from_string(onnx_without_functions(path))
    ops = {f.name for f in original.functions if f.domain == DOMAIN}
    assert ops == set(tp.PLUGIN_OPS) and not {f.name for f in stripped.functions} & ops
    assert [n.op_type for n in stripped.graph.node] == [n.op_type for n in original.graph.node]
    logger = _capturing_logger(trt)
    _parse_onnx(trt, trt.Builder(logger), logger, path, "fp32")  # bodies: parses
    with pytest.raises(OnnxParseError, match="GraphPropagate") as err:  # no bodies, no plugin registered
        _parse_onnx(trt, trt.Builder(logger), logger, path, "fp32", plugins=True)
    assert "load a plugin" in str(err.value)


def test_build_with_plugins_is_one_line_and_exit_2_on_tensorrt_rtx(bundles, tmp_path, capsys):
    from vtprune.cli import main

    copy = tmp_path / "b"
    shutil.copytree(bundles["tiny-llava"], copy)
    before = sorted(p.name for p in copy.iterdir())
    assert main(["build", str(copy), "--target", "sm89", "--plugins"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot add plugin layers" in err[0] and "without --plugins" in err[0]
    assert sorted(p.name for p in copy.iterdir()) == before
    assert main(["build", str(copy), "--plugins", "--graphs", "embed"]) == 2
    assert "no graph of embed has a vtprune op" in capsys.readouterr().err


def test_build_refuses_plugins_before_touching_the_bundle():
    with pytest.raises(ConfigError, match="cannot add plugin layers"):
        from vtprune.backends.trt.build import require_plugins

        require_plugins(trt, "tensorrt-rtx")
