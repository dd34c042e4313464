"""Static batches on pages with prefix caching, as the harness runs them (a continuous run with
admission 'batch' and kv_memory 'paged'), against the naive engine, with the prefix-cache metrics."""

from __future__ import annotations

import pytest

import models
from experiments.config import ContinuousRunConfig, WorkloadConfig
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
def test_batches_on_pages_match_naive_greedy(tiny_model, workload, naive_tokens, caching):
    run = ContinuousRunConfig(name="p", engine="continuous", admission="batch", kv_memory="paged", max_num_seqs=3,
                              num_blocks=128, block_size=4, enable_prefix_caching=caching)
    engine = make_engine(tiny_model, run, workload)
    engine.warmup()
    trace = engine.serve(workload, lambda n: None)
    assert [engine.outputs[r.request_id] for r in workload] == naive_tokens
    assert trace.num_compilations == 0  # the warm-up compiled every shape
    assert trace.extra_metrics["num_preemptions"] == 0
    cached, hit_rate = trace.extra_metrics["cached_prompt_token_fraction"], trace.extra_metrics["prefix_cache_hit_rate"]
    if caching:  # 21 shared tokens = 5 full blocks of 4, reused by every request after the first
        assert cached == pytest.approx(6 * 20 / sum(len(r.prompt) for r in workload))
        looked_up = sum((len(r.prompt) - 1) // 4 for r in workload)  # full blocks before a prompt's last token
        assert hit_rate == pytest.approx(6 * 5 / looked_up)  # the 6 later requests x 5 shared blocks
    else:
        assert cached == hit_rate == 0
