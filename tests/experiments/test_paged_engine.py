"""The paged engine (static batches, blocks on demand, prefix caching) against the naive engine."""

from __future__ import annotations

import pytest

import models
from experiments.config import PagedRunConfig, WorkloadConfig
from experiments.engines import make_engine
from experiments.workloads import build_workload


@pytest.fixture(scope="module")
def workload(tiny_model):
    config = WorkloadConfig(kind="alpaca", num_requests=7, seed=3, max_output_len=6, shared_prefix_len=21)
    return build_workload(config, vocab_size=tiny_model.config.vocab_size)


@pytest.fixture(scope="module")
def naive_tokens(tiny_model, workload):
    return [models.generate(tiny_model, [list(r.prompt)], max_new_tokens=r.output_len, ignore_eos=True)[0]
            for r in workload]


@pytest.mark.parametrize("caching", [False, True])
def test_paged_engine_matches_naive_greedy(tiny_model, workload, naive_tokens, caching):
    run = PagedRunConfig(name="p", engine="paged", batch_size=3, block_size=4, enable_prefix_caching=caching)
    engine = make_engine(tiny_model, run, workload)
    engine.warmup()
    trace = engine.serve(workload, lambda n: None)
    assert [engine.outputs[r.request_id] for r in workload] == naive_tokens
    assert trace.num_compilations == 0  # the warm-up compiled every shape
    assert engine.manager.num_used_blocks == 0  # every block came back
    cached = trace.extra_metrics["cached_prompt_token_fraction"]
    if caching:  # 21 shared tokens = 5 full blocks of 4, reused by every request after the first
        assert cached == pytest.approx(6 * 20 / sum(len(r.prompt) for r in workload))
        assert engine.manager.prefix_hits == 6 * 5  # the 6 later requests x 5 shared blocks
    else:
        assert cached == 0
