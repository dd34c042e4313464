"""Penalties against a plain numpy loop, and the sampler's static flags."""

from __future__ import annotations

import numpy as np

from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.sampler import SamplerFlags, apply_penalties, build_inputs
from continuous_batching.sampling_params import SamplingParams
from models.llama import forward
from models.sampling import request_key


def penalties_reference(logits, prompt, output, rep, presence, frequency):
    """vLLM's rules, one token at a time."""
    out = logits.copy()
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] -= frequency * output.count(t) + presence
    return out


def test_penalties_match_the_reference():
    rng = np.random.default_rng(0)
    vocab = 40
    logits = rng.standard_normal((3, vocab)).astype(np.float32) * 3
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(),  # no penalty: untouched
              SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5)]
    histories = [([1, 2, 3, 3], [3, 4, 4, 4, 7]), ([5, 6], [6]), ([9], [])]
    inputs = build_inputs(params, [request_key(0, i) for i in range(3)], [0, 0, 0], histories, num_rows=4)
    got = np.asarray(apply_penalties(np.concatenate([logits, np.zeros((1, vocab), np.float32)]), inputs))
    for row, (p, (prompt, output)) in enumerate(zip(params, histories)):
        want = penalties_reference(logits[row], prompt, output, p.repetition_penalty, p.presence_penalty,
                                   p.frequency_penalty)
        np.testing.assert_allclose(got[row], want, rtol=1e-6, atol=1e-6)


def test_flags_pick_the_cheapest_sampler():
    greedy = SamplingParams(temperature=0)
    assert SamplerFlags.for_params([greedy]) == SamplerFlags("greedy", False, False)
    assert SamplerFlags.for_params([greedy, SamplingParams(top_k=5)]).kind == "filtered"
    assert SamplerFlags.for_params([SamplingParams()]).kind == "random"
    assert SamplerFlags.for_params([SamplingParams(temperature=0, presence_penalty=1.0, logprobs=0)]) == \
        SamplerFlags("greedy", True, True)


def test_a_strong_repetition_penalty_stops_greedy_repeats(tiny_model):
    prompt = [5, 6, 7, 5, 6, 7]
    engine = Engine(tiny_model, EngineConfig(num_blocks=16, block_size=4, max_num_seqs=2, max_model_len=64))
    plain, penalized = engine.generate(
        [prompt, prompt], [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                           SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=50.0)],
        progress=False)
    tokens = penalized.outputs[0].token_ids
    assert len(set(plain.outputs[0].token_ids)) < 20  # greedy alone repeats itself
    assert len(set(tokens)) == 20 and not set(tokens) & set(prompt)


def test_penalized_greedy_tokens_follow_the_reference(tiny_model):
    """Every engine token is the argmax of the model's logits after `penalties_reference`."""
    prompt = [9, 10, 9, 11]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.2,
                            presence_penalty=0.7, frequency_penalty=0.4)
    engine = Engine(tiny_model, EngineConfig(num_blocks=16, block_size=4, max_num_seqs=2, max_model_len=64))
    tokens = engine.generate([prompt], params, progress=False)[0].outputs[0].token_ids
    full = prompt + tokens
    logits, _ = forward(tiny_model.params, np.asarray(full)[None], np.arange(len(full))[None],
                        config=tiny_model.config)
    logits = np.asarray(logits[0])
    for i, token in enumerate(tokens):
        row = penalties_reference(logits[len(prompt) - 1 + i], prompt, tokens[:i], 1.2, 0.7, 0.4)
        assert token == int(np.argmax(row))
