"""PruneConfig validation and serialisation, FLOPs accounting, and the import-weight contract."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vtprune import methods
from vtprune.config import PruneConfig, parse_keep
from vtprune.errors import ConfigError
from vtprune.flops import FlopsReport, TextDims, gprune_macs, prefill_macs, prune_stage_macs


@pytest.mark.parametrize(("text", "value"), [("64", 64), ("0.25", 0.25), ("25%", 0.25), ("1.0", 1.0)])
def test_parse_keep(text, value):
    assert parse_keep(text) == value and type(parse_keep(text)) is type(value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"method": "fastvv"}, "unknown pruning method"), ({"method": "gprune"}, "needs a budget"),
     ({"method": "gprune", "keep": 0}, "positive"), ({"method": "gprune", "keep": 1.5}, r"\(0, 1\]"),
     ({"method": "none", "keep": 16}, "only applies"), ({"method": "gprune", "keep": 4, "tau": 0.0}, "tau"),
     ({"method": "gprune", "keep": 4, "theta": 2.0}, "theta"), ({"method": "gprune", "keep": 4, "iters": -1}, "iters"),
     ({"method": "gprune", "keep": 4, "degree": "x"}, "degree"),
     ({"method": "gprune", "keep": 4, "positions": "x"}, "positions")],
)  # fmt: skip
def test_config_validation_names_the_bad_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**kwargs)


def test_config_round_trip():
    cfg = PruneConfig(method="gprune", keep=0.3, theta=0.4, iters=3)
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown PruneConfig fields: bogus"):
        PruneConfig.from_dict({"bogus": 1})


def test_prefill_macs_reduces_to_the_spec_formula_without_gqa():
    d, m, n, L, V = 4096, 14336, 3000, 32, 128256
    dims = TextDims(layers=L, hidden=d, intermediate=m, heads=32, kv_heads=32, head_dim=128, vocab=V)
    assert prefill_macs(dims, n) == L * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m) + d * V


def test_gqa_shrinks_kv_projections():
    mha = TextDims(2, 64, 128, 4, 4, 16, 100)
    gqa = TextDims(2, 64, 128, 4, 2, 16, 100)
    assert prefill_macs(mha, 10) - prefill_macs(gqa, 10) == 2 * 10 * 64 * 2 * 32


def test_gprune_macs_and_report():
    assert gprune_macs([576, 2304], 4096, 5) == 576**2 * 4096 + 5 * 576**2 + 2304**2 * 4096 + 5 * 2304**2
    r = FlopsReport(1000, 400, 100)
    assert r.saved_fraction == pytest.approx(0.5) and r.to_dict()["saved_fraction"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("method", "expected"),
    [("gprune", gprune_macs([576, 2304], 4096, 3)), ("divprune", (576**2 + 2304**2) * 4096), ("random", 0),
     ("uniform", 0), ("none", 0)],
)  # fmt: skip
def test_prune_stage_macs_per_method(method, expected):
    cfg = PruneConfig(method=method, keep=64 if method != "none" else None, iters=3)
    assert prune_stage_macs(cfg, [576, 2304], 4096) == expected


def test_in_llm_methods_have_no_pre_llm_stage():
    for method in methods.names("in_llm"):
        assert prune_stage_macs(PruneConfig(method=method, keep=64), [576], 4096) == 0


def test_import_vtprune_is_light():
    code = (
        "import sys, vtprune, vtprune.config, vtprune.errors, vtprune.flops; "
        "heavy = {'torch', 'transformers', 'onnxruntime', 'tensorrt', 'tensorrt_rtx', 'onnx'} & set(sys.modules); "
        "print(sorted(heavy)); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prune_package_needs_no_model_library():
    code = (
        "import sys, vtprune.prune; "
        "bad = {'transformers', 'onnxruntime', 'tensorrt'} & set(sys.modules); sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
