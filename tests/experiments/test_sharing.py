"""Memory saved by block sharing (vLLM Fig. 15): hand-checked parallel sampling, beam search on tiny."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import pytest

import models
from experiments.config import ConfigError, SharingRunConfig, parse_config
from experiments.metrics import summarize
from experiments.tables import markdown_table
from experiments.sharing import (SharingCounter, SharingSimEngine, beam_search, sample_output_lens,
                                 simulate_parallel_sampling)
from experiments.workloads import Request
from paged_attention.block_manager import BlockManager


@pytest.fixture(scope="module")
def tiny():
    return models.load("tiny")


def run_engine(model, requests, **kwargs):
    config = SharingRunConfig(name="s", engine="sharing_sim", **kwargs)
    done = []
    trace = SharingSimEngine(model, config, requests).serve(requests, done.append)
    assert sum(done) == len(trace.records)
    return summarize(trace)


def test_parallel_sampling_full_prompt_blocks_by_hand(tiny):
    """Prompt 8 tokens = 2 full blocks of 4, shared by n=2 samples of 4 tokens each. Every step: with
    sharing 2 prompt blocks + 1 + 1 own blocks = 4; without 3 + 3 = 6. Saved 1 - 16/24 = 1/3. The
    other sample's length is drawn from the workload's lengths: here only 4."""
    m = run_engine(tiny, [Request(0, (7,) * 8, 4, 0.0)], mode="parallel_sampling", width=2, block_size=4)
    assert m["memory_saved_fraction"] == pytest.approx(1 / 3)
    assert (m["blocks_with_sharing_mean"], m["blocks_without_sharing_mean"]) == (4, 6)
    assert (m["cow_copies"], m["iterations"], m["num_requests"]) == (0, 4, 1)
    # real tokens in the used blocks at step t: 8 prompt + t per sample; slots: 4 blocks of 4
    assert m["kv_utilization"] == pytest.approx(sum(8 + 2 * t for t in range(1, 5)) / (4 * 16))
    table = markdown_table([{"name": "s", "config": {"mode": "parallel_sampling", "width": 2}, "metrics": m}])
    assert table.splitlines()[0].startswith("| run | mode | n / beam width | memory saved |")
    assert "| s | parallel_sampling | 2 | 33.3% | 4.0 | 6.0 | 0 | 1 |" in table


def test_parallel_sampling_copy_on_write_and_early_finish_by_hand():
    """Prompt 6 tokens (block A full, block B half full), n=2, outputs 3 and 1, block size 4.
    Step 1: sample 0 writes into shared B -> copy B'; sample 1 then owns B: {A, B, B'} = 3 vs 2 + 2;
    sample 1 finishes. Step 2: {A, B'} = 2 vs 2. Step 3: {A, B', C} = 3 vs 3. Saved 1 - 8/9."""
    manager, counter = BlockManager(16, 4), SharingCounter(4)
    simulate_parallel_sampling(manager, [5] * 6, [3, 1], counter)
    assert (counter.with_sharing, counter.without_sharing, counter.steps) == (8, 9, 3)
    assert counter.cow_copies == 1 and counter.saved_fraction == pytest.approx(1 / 9)
    assert manager.num_used_blocks == 0


def test_sample_output_lens_are_seeded_draws_from_the_workload():
    requests = [Request(i, (1,), n, 0.0) for i, n in enumerate([3, 50, 7])]
    lens = sample_output_lens(requests, 4, seed=1)
    assert [row[0] for row in lens] == [3, 50, 7]  # sample 0: the request's own length
    assert all(len(row) == 4 and set(row[1:]) <= {3, 50, 7} for row in lens)
    assert lens == sample_output_lens(requests, 4, seed=1) != sample_output_lens(requests, 4, seed=2)


def sequence_log_prob(model, prompt, generated) -> float:
    """Sum of the generated tokens' log-probs, from one forward pass without a cache."""
    tokens = jnp.asarray([list(prompt) + list(generated)], jnp.int32)
    positions = jnp.arange(tokens.shape[1])[None]
    logits, _ = models.forward(model.params, tokens, positions, None, config=model.config)
    log_probs = jax.nn.log_softmax(logits[0, len(prompt) - 1:-1], axis=-1)  # predicts generated[i]
    return float(log_probs[jnp.arange(len(generated)), jnp.asarray(generated)].sum())


def test_beam_search_scores_match_an_uncached_forward_and_frees_every_block(tiny):
    request = Request(0, tuple(range(100, 119)), 9, 0.0)  # 19-token prompt, 9 steps, blocks of 4
    manager, counter = BlockManager(64, 4), SharingCounter(4)
    beams, scores = beam_search(tiny, request, 3, manager, counter, max_len=64)
    assert manager.num_used_blocks == 0 and manager.num_free_blocks == 64
    assert len(beams) == 3 and all(len(b) == 9 for b in beams) and len({tuple(b) for b in beams}) == 3
    assert scores == sorted(scores, reverse=True)
    for beam, score in zip(beams, scores):  # the reordered cache gave every beam its own history
        assert score == pytest.approx(sequence_log_prob(tiny, request.prompt, beam), abs=1e-4)
    assert counter.steps == 9 and 0 < counter.saved_fraction <= 1
    assert counter.cow_copies > 0  # some parent had two children writing into a partly filled block


def test_beam_search_engine_saves_memory(tiny):
    requests = [Request(i, tuple(range(100, 105 + 7 * i)), 12, 0.0) for i in range(3)]
    m = run_engine(tiny, requests, mode="beam_search", width=4, block_size=4, max_requests=2)
    assert m["num_requests"] == 2 and m["iterations"] == 24
    assert 0 < m["memory_saved_fraction"] <= 1
    assert m["blocks_with_sharing_mean"] < m["blocks_without_sharing_mean"]


BASE = {"experiment": "x", "workload": {"kind": "alpaca", "num_requests": 3},
        "runs": [{"name": "a", "engine": "sharing_sim", "mode": "beam_search", "width": 2}]}


@pytest.mark.parametrize("change, expected", [
    ({"mode": "greedy"}, "runs[0].mode: Input should be 'parallel_sampling' or 'beam_search'"),
    ({"width": 1}, "runs[0].width: Input should be greater than or equal to 2"),
    ({"max_requests": 0}, "runs[0].max_requests: Input should be greater than 0"),
    ({"beam_width": 4}, "runs[0].beam_width: unknown key; allowed keys: block_size, engine, max_requests, "
                        "mode, name, seed, width"),
])
def test_bad_sharing_configs_name_the_key(change, expected):
    data = copy.deepcopy(BASE)
    data["runs"][0].update(change)
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert expected in str(err.value)


def test_sharing_config_defaults():
    run = parse_config(BASE).runs[0]
    assert (run.block_size, run.max_requests, run.seed) == (16, 20, 0)
