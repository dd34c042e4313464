"""The engine end to end on the tiny model: every policy gives each request its greedy reference
tokens (batch invariance), seeded sampling is batch invariant too, bad input is refused without
disturbing other requests, abort, stop tokens and strings, log-probs, n > 1, bounded compilations."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import models
from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.model_runner import num_compilations
from continuous_batching.sampling_params import SamplingParams
from models.llama import forward

GREEDY = dict(temperature=0, ignore_eos=True)
SMALL = dict(num_blocks=24, block_size=4, max_num_seqs=6, max_num_batched_tokens=48, max_model_len=64,
             num_cpu_blocks=32)


@pytest.fixture(scope="module")
def workload(tiny_model):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 263, int(rng.integers(1, 30))).tolist() for _ in range(12)]
    max_tokens = [int(rng.integers(1, 25)) for _ in prompts]
    reference = models.generate(tiny_model, prompts, max_new_tokens=max(max_tokens), ignore_eos=True, batch_size=4)
    return prompts, max_tokens, [r[:m] for r, m in zip(reference, max_tokens)]


def tokens_of(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("policy,preemption", [("continuous", "recompute"), ("continuous", "swap"),
                                               ("chunked_prefill", "recompute"), ("chunked_prefill", "swap"),
                                               ("static", "recompute"), ("request_level", "recompute")])
def test_every_policy_gives_the_greedy_reference_tokens(tiny_model, workload, policy, preemption):
    prompts, max_tokens, reference = workload
    engine = Engine(tiny_model, EngineConfig(policy=policy, preemption=preemption, reservation="pow2", **SMALL))
    outputs = engine.generate(prompts, [SamplingParams(max_tokens=m, **GREEDY) for m in max_tokens], progress=False)
    assert tokens_of(outputs) == reference
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)
    if policy in ("continuous", "chunked_prefill"):
        assert engine.scheduler.num_preemptions > 0  # 24 blocks of 4 tokens is too few: it preempted
    assert engine.manager.num_free_blocks == SMALL["num_blocks"]


def test_seeded_sampling_is_batch_invariant(tiny_model, workload):
    prompts, _, _ = workload
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=11, max_tokens=12, ignore_eos=True)
    alone = Engine(tiny_model, EngineConfig(**SMALL)).generate([prompts[0]], params, progress=False)
    crowd = Engine(tiny_model, EngineConfig(policy="chunked_prefill", **SMALL)).generate(
        prompts[3:8] + [prompts[0]], [SamplingParams(temperature=1.0, max_tokens=9)] * 5 + [params], progress=False)
    assert tokens_of(alone) == tokens_of(crowd[-1:])
    greedy = Engine(tiny_model, EngineConfig(**SMALL)).generate([prompts[0]], SamplingParams(max_tokens=12, **GREEDY),
                                                                progress=False)
    assert tokens_of(alone) != tokens_of(greedy)  # it did sample


@pytest.mark.parametrize("bad,field", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=60), "max_model_len=64"), (dict(beam_width=11), "beam_width"),
    (dict(stop=("x",)), "stop"), (dict(colour=1), "allowed")])
def test_bad_requests_are_refused_and_the_engine_keeps_serving(tiny_model, workload, bad, field):
    prompts, max_tokens, reference = workload
    engine = Engine(tiny_model, EngineConfig(**SMALL))
    first = engine.add_request(prompts[1], SamplingParams(max_tokens=max_tokens[1], **GREEDY))
    engine.step()
    with pytest.raises(ValueError, match=field):
        engine.add_request(prompts[0], {**dict(temperature=0, max_tokens=4), **bad})
    for bad_prompt in ([], [263], "text without a tokenizer"):
        with pytest.raises(ValueError, match="prompt"):
            engine.add_request(bad_prompt, SamplingParams())
    finished = [o for _ in range(100) for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == [first] and tokens_of(finished) == [reference[1]]


def test_abort_frees_the_request_and_others_finish(tiny_model, workload):
    prompts, max_tokens, reference = workload
    engine = Engine(tiny_model, EngineConfig(**SMALL))
    keep = engine.add_request(prompts[2], SamplingParams(max_tokens=max_tokens[2], **GREEDY))
    drop = engine.add_request(prompts[3], SamplingParams(max_tokens=20, **GREEDY))
    engine.step()
    engine.abort(drop)
    engine.abort(12345)  # unknown: ignored
    outs = [o for _ in range(100) for o in engine.step() if o.finished]
    assert [o.request_id for o in outs] == [keep] and tokens_of(outs) == [reference[2]]
    assert not engine.has_unfinished() and engine.manager.num_free_blocks == SMALL["num_blocks"]


def test_stop_token_ids_and_eos(tiny_model, workload):
    prompts, _, reference = workload
    stop_at = reference[4][1]
    engine = Engine(tiny_model, EngineConfig(**SMALL))
    out = engine.generate([prompts[4]], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(stop_at,)),
                          progress=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == reference[4][:reference[4].index(stop_at) + 1]


class CharTokenizer:
    """Token t decodes to one letter, so stop strings are easy to place."""

    def decode(self, ids):
        return "".join(chr(97 + t % 26) for t in ids)


def test_stop_strings_cut_the_text(tiny_model, workload):
    prompts, _, _ = workload
    model = dataclasses.replace(tiny_model, tokenizer=CharTokenizer())
    free = Engine(model, EngineConfig(**SMALL)).generate([prompts[5]], SamplingParams(max_tokens=20, **GREEDY),
                                                         progress=False)[0].outputs[0]
    stop = free.text[5:7]
    out = Engine(model, EngineConfig(**SMALL)).generate(
        [prompts[5]], SamplingParams(max_tokens=20, stop=(stop,), **GREEDY), progress=False)[0].outputs[0]
    cut = free.text.index(stop)
    assert out.finish_reason == "stop" and out.text == free.text[:cut]
    assert out.token_ids == free.token_ids[:cut + len(stop)]  # ids keep the token completing the stop


def test_logprobs_are_the_models_log_softmax(tiny_model, workload):
    prompts, _, _ = workload
    engine = Engine(tiny_model, EngineConfig(**SMALL))
    out = engine.generate([prompts[6]], SamplingParams(max_tokens=4, logprobs=3, **GREEDY), progress=False)[0]
    tokens = prompts[6] + out.outputs[0].token_ids
    logits, _ = forward(tiny_model.params, np.asarray(tokens)[None], np.arange(len(tokens))[None],
                        config=tiny_model.config)
    logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    for i, (chosen, top) in enumerate(out.outputs[0].logprobs):
        row = logp[len(prompts[6]) - 1 + i]
        assert chosen == pytest.approx(row[out.outputs[0].token_ids[i]], abs=1e-4)
        assert [t for t, _ in top] == np.argsort(-row)[:3].tolist()
        assert [lp for _, lp in top] == pytest.approx(np.sort(row)[::-1][:3], abs=1e-4)


def test_n_samples_differ_and_repeat_with_a_seed(tiny_model, workload):
    prompts, _, _ = workload
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    first = Engine(tiny_model, EngineConfig(**SMALL)).generate([prompts[7]], params, progress=False)[0]
    again = Engine(tiny_model, EngineConfig(policy="chunked_prefill", **SMALL)).generate(
        [prompts[7]], params, progress=False)[0]
    samples = [o.token_ids for o in first.outputs]
    assert len(samples) == 3 and len({tuple(s) for s in samples}) == 3
    assert samples == [o.token_ids for o in again.outputs]


def test_compilations_stay_bounded(tiny_model, workload):
    prompts, max_tokens, _ = workload
    engine = Engine(tiny_model, EngineConfig(policy="chunked_prefill", **SMALL))
    engine.generate(prompts * 2, [SamplingParams(max_tokens=m, **GREEDY) for m in max_tokens * 2], progress=False)
    before = num_compilations()
    engine.generate(prompts[::-1], [SamplingParams(max_tokens=m, **GREEDY) for m in max_tokens[::-1]],
                    progress=False)
    assert num_compilations() - before <= 3  # a replay in another order finds its shapes compiled
    assert len(engine.runner.shapes_run) <= 24  # prefill tokens 16/24/32/48 x rows x decode rows (1 for a lone one, 4, 8) x blocks


@pytest.mark.parametrize("bad,field", [(dict(policy="orca"), "policy"), (dict(reservation="min"), "reservation"),
                                       (dict(preemption="swap"), "num_cpu_blocks"), (dict(num_blocks=0), "num_blocks"),
                                       (dict(policy="static", enable_prefix_caching=True), "enable_prefix_caching")])
def test_engine_config_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"EngineConfig.{field}"):
        EngineConfig(**bad)
    with pytest.raises(ValueError, match="allowed"):
        EngineConfig.from_dict({"polcy": "static"})
