"""The engine's `static` policy end to end on the tiny model: FasterTransformer's per-batch KV
reservation (batch size x (longest prompt + largest max_tokens), rows rounded to whole blocks) as
the engine's manager reports it, batches formed first-come first-served within the KV blocks, the
reservation held until the whole batch finishes, greedy tokens equal to the reference, and the
max_model_len check unchanged."""

from __future__ import annotations

import numpy as np
import pytest

import models
from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.sampling_params import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


def run_static(model, prompts, max_tokens, **config):
    """Step the engine to the end; per step: (request ids scheduled, blocks used, real tokens), read
    after the step (a finished batch's blocks are back by then)."""
    engine = Engine(model, EngineConfig(policy="static", block_size=4, max_num_batched_tokens=8, **config))
    ids = [engine.add_request(p, SamplingParams(max_tokens=m, **GREEDY)) for p, m in zip(prompts, max_tokens)]
    seq_to_request = {seq.seq_id: rid for rid, req in engine.requests.items() for seq in req.seqs}
    steps, done = [], {}
    while engine.has_unfinished():
        assert len(steps) < 100
        outs = engine.step()
        steps.append(([seq_to_request[p.seq_id] for p in engine.stats.last_plan.seqs],
                      engine.manager.num_used_blocks, engine.manager.num_real_tokens))
        done.update({o.request_id: o.outputs[0].token_ids for o in outs if o.finished})
    return steps, [done[i] for i in ids], engine


def reference(model, prompts, max_tokens):
    out = models.generate(model, prompts, max_new_tokens=max(max_tokens), ignore_eos=True, batch_size=4)
    return [r[:m] for r, m in zip(out, max_tokens)]


def test_static_reserves_per_batch_and_the_next_batch_waits_for_the_whole_batch(tiny_model):
    """Block size 4, 12 blocks. Prompts 3/9/5 with max_tokens 2/6/1 reserve 3 x (9 + 6) = 45 tokens:
    3 rows of ceil(15 / 4) = 4 blocks, all 12 blocks. A fourth request (prompt 2, max_tokens 1) would
    need a fourth row: it waits, then runs alone in 1 block. (The old `max` rule, 32 tokens = 8
    blocks per request, ran these one at a time.)"""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 263, n).tolist() for n in (3, 9, 5, 2)]
    max_tokens = [2, 6, 1, 1]
    steps, tokens, engine = run_static(tiny_model, prompts, max_tokens, num_blocks=12, max_num_seqs=8,
                                       max_model_len=32)
    assert [ids for ids, _, _ in steps] == [[0, 1, 2], [0, 1], [1], [1], [1], [1], [3]]
    # after each step: request 2 finished in step 1, request 0 in step 2, yet all 12 blocks stay held
    # until request 1's sixth token; real tokens are the live members' KV (prompt + placed outputs)
    assert [used for _, used, _ in steps] == [12] * 5 + [0, 0]
    assert [real for _, _, real in steps] == [3 + 9, 10, 11, 12, 13, 0, 0]
    assert tokens == reference(tiny_model, prompts, max_tokens)
    assert engine.manager.free_extents == [(0, 12)]


def test_rows_can_exceed_max_model_len_and_tokens_stay_exact(tiny_model):
    """Prompt 30 with max_tokens 2 beside prompt 2 with max_tokens 30: each request fits
    max_model_len 32, but FT pads both rows to 30 + 30 = 60 tokens = 15 blocks, 30 blocks in all.
    With 40 blocks they run as one batch; with 20 they run one after the other."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 263, 30).tolist(), rng.integers(3, 263, 2).tolist()]
    max_tokens = [2, 30]
    expected = reference(tiny_model, prompts, max_tokens)
    together, tokens, _ = run_static(tiny_model, prompts, max_tokens, num_blocks=40, max_num_seqs=4,
                                     max_model_len=32)
    assert together[0][:2] == ([0, 1], 30) and tokens == expected
    apart, tokens, _ = run_static(tiny_model, prompts, max_tokens, num_blocks=20, max_num_seqs=4,
                                  max_model_len=32)
    assert apart[0][:2] == ([0], 8) and apart[2][0] == [1] and tokens == expected  # 30 + 2: 8 blocks alone


def test_a_request_longer_than_max_model_len_is_still_refused(tiny_model):
    engine = Engine(tiny_model, EngineConfig(policy="static", block_size=4, num_blocks=64, max_model_len=32))
    with pytest.raises(ValueError, match="max_model_len=32"):
        engine.add_request([5] * 30, SamplingParams(max_tokens=3, **GREEDY))
    engine.add_request([5] * 30, SamplingParams(max_tokens=2, **GREEDY))  # exactly 32: accepted
