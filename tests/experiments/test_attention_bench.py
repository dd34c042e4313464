"""The attention micro-benchmark compares equal work: every backend gives the same output."""

from __future__ import annotations

import numpy as np
import pytest

import models
from experiments.attention_bench import AttentionBenchEngine
from experiments.config import AttentionBenchRunConfig


@pytest.mark.parametrize("block_size", [4, 16])
def test_backends_compute_the_same_attention(block_size):
    model = models.load("tiny")
    outputs = {}
    for backend in ("contiguous", "paged_reference", "paged"):
        config = AttentionBenchRunConfig(name=backend, engine="attention_bench", backend=backend,
                                         batch_size=3, context_len=37, block_size=block_size, iterations=2)
        engine = AttentionBenchEngine(model, config, [])
        outputs[backend] = np.asarray(engine.fn(engine.q))
        trace = engine.serve([], lambda n: None)
        assert trace.extra_metrics["attention_us_per_call"] > 0
    np.testing.assert_allclose(outputs["paged_reference"], outputs["contiguous"], atol=1e-5)
    np.testing.assert_allclose(outputs["paged"], outputs["contiguous"], atol=1e-5)
