"""In-LLM selection rules on hand-built inputs, and the method registry's reach (tests, sweep)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from vtprune import methods
from vtprune.runtime.layerwise import dart_select

ROOT = Path(__file__).resolve().parents[2]


def test_dart_keeps_pivots_and_the_tokens_least_like_them():
    # 8 tokens in 2-D: a cluster near (1, 0), a cluster near (0, 1), one opposite (-1, 0)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0], [0.9, 0.0],
                      [0.0, 0.9]])  # fmt: skip
    norms = torch.tensor([9.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])  # token 0 is the only pivot with pivots=1
    assert dart_select(x, norms, 2, pivots=1).tolist() == [0, 5]  # the opposite token is least similar
    assert dart_select(x, norms, 4, pivots=1).tolist() == [0, 3, 5, 7]  # then the orthogonal ones (cos 0)
    two = torch.tensor([0.1, 0.1, 0.1, 9.0, 0.1, 0.1, 0.1, 8.0])  # pivots 3 and 7 (same direction)
    kept = dart_select(x, two, 4, pivots=2)
    # pivot 3 claims token 2 (cos < 0 with (0, 1)); pivot 7 then claims one of the cos-0 tokens
    assert kept.tolist() == sorted(kept.tolist()) and {2, 3, 7} <= set(kept.tolist()) and len(set(kept.tolist())) == 4


def test_dart_budget_smaller_than_the_pivot_count():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    norms = torch.arange(10.0)
    assert dart_select(x, norms, 2, pivots=4).tolist() == [8, 9]


def test_dart_select_on_a_batch_equals_each_row_alone():
    g = torch.Generator().manual_seed(1)
    x, norms = torch.randn(3, 12, 5, generator=g), torch.rand(3, 12, generator=g)
    batched = dart_select(x, norms, 7, pivots=4)  # (3, 7): the exported graph's batched form
    assert batched.tolist() == [dart_select(x[i], norms[i], 7, pivots=4).tolist() for i in range(3)]


def test_every_method_is_in_the_sweep_and_every_in_llm_method_is_tested():
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "benchmarks" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    assert {v["method"] for v in sweep.VARIANTS.values()} == set(methods.names())
    tested = (ROOT / "tests" / "runtime" / "test_layerwise.py").read_text()
    for method in methods.names("in_llm"):
        assert f'PruneConfig("{method}"' in tested, f"{method} has no layer-loop test"
