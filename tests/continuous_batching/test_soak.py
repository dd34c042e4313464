"""Soak: 300 requests of random lengths through a KV cache 10x too small for them all. Every request
finishes with exactly its greedy reference tokens, under recompute and swap preemption, and the
cache ends empty."""

from __future__ import annotations

import numpy as np
import pytest

import models
from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.sampling_params import SamplingParams

NUM_REQUESTS, BLOCK_SIZE = 300, 4


@pytest.fixture(scope="module")
def soak_workload(tiny_model):
    rng = np.random.default_rng(2026)
    prompts = [rng.integers(3, 263, int(rng.integers(1, 48))).tolist() for _ in range(NUM_REQUESTS)]
    max_tokens = [int(rng.integers(1, 40)) for _ in prompts]
    reference = models.generate(tiny_model, prompts, max_new_tokens=max(max_tokens), ignore_eos=True,
                                batch_size=32)
    return prompts, max_tokens, [r[:m] for r, m in zip(reference, max_tokens)]


@pytest.mark.parametrize("policy,preemption", [("continuous", "recompute"), ("chunked_prefill", "swap")])
def test_soak_under_a_tenfold_memory_shortage(tiny_model, soak_workload, policy, preemption):
    prompts, max_tokens, reference = soak_workload
    blocks_needed = sum(-(-(len(p) + m) // BLOCK_SIZE) for p, m in zip(prompts, max_tokens))
    num_blocks = blocks_needed // 10  # every request admitted at once would need 10x this
    engine = Engine(tiny_model, EngineConfig(
        policy=policy, preemption=preemption, num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=64,
        max_num_batched_tokens=256, max_model_len=96, num_cpu_blocks=num_blocks // 2))
    rng = np.random.default_rng(7)
    pending = list(range(NUM_REQUESTS))
    ids: dict[int, int] = {}
    done: dict[int, list[int]] = {}
    while pending or engine.has_unfinished():  # requests keep arriving while others run
        for _ in range(int(rng.integers(0, 12))):
            if pending:
                i = pending.pop(0)
                ids[engine.add_request(prompts[i], SamplingParams(max_tokens=max_tokens[i], temperature=0,
                                                                  ignore_eos=True))] = i
        for out in engine.step():
            if out.finished:
                assert out.request_id not in done
                done[out.request_id] = out.outputs[0].token_ids
    assert len(done) == NUM_REQUESTS
    mismatched = [ids[r] for r, tokens in done.items() if tokens != reference[ids[r]]]
    assert mismatched == []
    assert engine.scheduler.num_preemptions > 10
    assert engine.manager.num_free_blocks == num_blocks
