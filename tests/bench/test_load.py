"""The competing load ``vtprune bench --background-load N`` runs while measuring."""

from __future__ import annotations

import multiprocessing

import pytest

from vtprune.bench.load import background_load


def test_background_load_runs_n_spinners_only_inside_the_block():
    before = set(multiprocessing.active_children())
    with background_load(2):
        spinners = set(multiprocessing.active_children()) - before
        assert len(spinners) == 2 and all(p.is_alive() for p in spinners)
    assert not any(p.is_alive() for p in spinners)
    with background_load(0):
        assert set(multiprocessing.active_children()) == before


def test_background_load_must_not_be_negative():
    from vtprune.bench.config import BenchConfig
    from vtprune.errors import ConfigError

    with pytest.raises(ConfigError, match="background-load"):
        BenchConfig(model="tiny-llava", background_load=-1)
