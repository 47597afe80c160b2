"""Token choice: greedy, seeded sampling, top-k / top-p, and the same choices in both runtimes."""

from __future__ import annotations

import numpy as np
import pytest

from vtprune.config import PruneConfig, SamplingConfig
from vtprune.errors import ConfigError
from vtprune.runtime.pipeline import PrunedVlm
from vtprune.runtime.sampling import TokenChooser

LOGITS = np.array([0.0, 3.0, 2.9, -1.0, 1.0])


def test_greedy_is_argmax():
    assert TokenChooser()(LOGITS) == 1


def test_top_k_one_is_greedy_whatever_the_temperature():
    choose = TokenChooser(SamplingConfig(temperature=5.0, top_k=1, seed=3))
    assert {choose(LOGITS) for _ in range(20)} == {1}


def test_top_p_restricts_to_the_nucleus():
    choose = TokenChooser(SamplingConfig(temperature=1.0, top_p=0.6, seed=0))
    assert {choose(LOGITS) for _ in range(200)} <= {1, 2}


def test_sampling_is_seeded_and_explores():
    cfg = SamplingConfig(temperature=2.0, seed=7)
    a = [TokenChooser(cfg)(LOGITS) for _ in range(1)]
    chooser_1, chooser_2 = TokenChooser(cfg), TokenChooser(cfg)
    seq_1 = [chooser_1(LOGITS) for _ in range(50)]
    assert seq_1 == [chooser_2(LOGITS) for _ in range(50)] and len(set(seq_1)) > 2 and a[0] == seq_1[0]


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top-k"), ({"top_p": 0.0}, "top-p")]
)
def test_sampling_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplingConfig(**kwargs)


def test_seeded_sampling_repeats_in_the_pytorch_pipeline(tiny_adapter, scene):
    cfg, sampling = PruneConfig(method="gprune", keep=0.5), SamplingConfig(temperature=1.5, seed=11)
    a = PrunedVlm(tiny_adapter, cfg, sampling).generate(scene, "what ?", max_new_tokens=12)
    b = PrunedVlm(tiny_adapter, cfg, sampling).generate(scene, "what ?", max_new_tokens=12)
    greedy = PrunedVlm(tiny_adapter, cfg).generate(scene, "what ?", max_new_tokens=12)
    assert a.token_ids == b.token_ids and a.token_ids != greedy.token_ids
    assert a.ttft_ms > 0 and a.peak_rss_mb > 0
