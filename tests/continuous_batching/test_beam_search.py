"""Beam search above the scheduler (vLLM V1 style): the beam state on hand-made candidates, then the
engine on the tiny model against a slow reference that runs the full forward on every beam from
scratch each step; with and without prefix caching, beside other requests, bad params, abort."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from continuous_batching.beam_search import Beam, BeamSearchState, beam_score, round_params
from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.sampling_params import SamplingParams
from models.llama import forward

BEAM = dict(temperature=0, ignore_eos=True)
CONFIG = dict(num_blocks=96, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)


# ----- the beam state, by hand ------------------------------------------------------------------
def test_advance_keeps_the_best_beams_and_completes_stop_tokens():
    state = BeamSearchState([7, 8], beam_width=2, max_tokens=3, stop_token_ids=frozenset({2}))
    assert state.round_prompts() == [[7, 8]]  # round 1: the empty beam
    assert state.record(0, [(5, -0.1), (6, -0.5), (7, -1.0), (8, -2.0), (9, -3.0)])  # one beam: round done
    assert state.beams == [Beam((5,), -0.1), Beam((6,), -0.5)] and state.round == 1
    assert state.round_prompts() == [[7, 8, 5], [7, 8, 6]]
    assert not state.record(1, [(11, -0.2), (2, -0.3), (12, -4.0), (13, -5.0)])  # beam 0 has not reported
    assert state.record(0, [(9, -1.0), (10, -1.2), (14, -3.0), (15, -4.0), (16, -0.01)])  # 5th: not a candidate
    assert state.completed == [Beam((6, 2), -0.8, stopped=True)]
    assert [b.tokens for b in state.beams] == [(6, 11), (5, 9)]
    assert [b.cum_logprob for b in state.beams] == pytest.approx([-0.7, -1.1])
    assert not state.finished and state.pending == {}


def test_finished_after_max_tokens_or_when_every_candidate_stops():
    state = BeamSearchState([1], beam_width=2, max_tokens=2)
    state.advance([[(4, -1.0), (5, -2.0), (6, -3.0), (7, -4.0)]])
    state.advance([[(8, -1.0), (9, -1.0)], [(8, -0.5), (9, -3.0)]])
    assert state.finished and state.round == 2
    with pytest.raises(ValueError, match="already finished"):
        state.advance([[(1, -1.0)]] * 2)
    stops = BeamSearchState([1], beam_width=2, max_tokens=5, stop_token_ids=frozenset({2, 3}))
    stops.advance([[(2, -0.5), (3, -0.7)]])
    assert stops.finished and stops.beams == [] and len(stops.completed) == 2 and stops.round == 1
    assert [b.tokens for b in stops.best(2)] == [(2,), (3,)]


def test_length_penalty_orders_the_final_beams():
    completed = Beam((6, 2), -0.8, stopped=True)  # output length 1: the stop token is not counted
    live = Beam((5, 9), -1.1)  # output length 2
    assert beam_score(completed) == pytest.approx(-0.8) and beam_score(live) == pytest.approx(-0.55)
    assert beam_score(live, 0.0) == pytest.approx(-1.1) and beam_score(live, 2.0) == pytest.approx(-0.275)
    assert beam_score(Beam((2,), -0.3, stopped=True)) == pytest.approx(-0.3)  # empty output: length 1
    for penalty, order in [(1.0, [live, completed]), (0.0, [completed, live])]:
        state = BeamSearchState([1], beam_width=2, max_tokens=2, length_penalty=penalty)
        state.beams, state.completed, state.round = [live], [completed], 2
        assert state.best(2) == order and state.best(1) == order[:1]


def test_round_params_ask_for_two_candidates_per_beam():
    p = round_params(SamplingParams(beam_width=3, n=2, max_tokens=9, **BEAM))
    assert (p.temperature, p.max_tokens, p.logprobs, p.ignore_eos, p.beam_width) == (0, 1, 6, True, 1)


# ----- the engine against a slow reference --------------------------------------------------------
dense_forward = jax.jit(forward, static_argnames=("config",))  # no cache: causal attention within tokens


def next_token_logprobs(model, seqs: list[list[int]]) -> np.ndarray:
    """f32[len(seqs), vocab]: log_softmax of each sequence's next-token logits, by the full forward
    over the whole sequence (zero-padded at the end to one [8, 64] shape: causal, so padding after a
    token does not change it, and one compilation serves every call)."""
    tokens = np.zeros((8, CONFIG["max_model_len"]), np.int32)
    for row, seq in enumerate(seqs):
        tokens[row, :len(seq)] = seq
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    logits, _ = dense_forward(model.params, tokens, positions, config=model.config)
    last = np.asarray(logits)[np.arange(len(seqs)), [len(seq) - 1 for seq in seqs]]
    return np.asarray(jax.nn.log_softmax(last, axis=-1))


def reference_beam_search(model, prompt, params, stop_ids=frozenset()):
    """Beam search by the book: every step runs the full forward (no cache) on every live beam."""
    width = params.beam_width
    beams, completed = [((), 0.0)], []
    for _ in range(params.max_tokens):
        if not beams:
            break
        logp = next_token_logprobs(model, [prompt + list(tokens) for tokens, _ in beams])
        live = []
        for (tokens, cum), row in zip(beams, logp):
            for t in np.argsort(-row, kind="stable")[:2 * width].tolist():
                (completed if t in stop_ids else live).append((tokens + (t,), cum + float(row[t])))
        beams = sorted(live, key=lambda b: -b[1])[:width]

    def score(beam):
        tokens, cum = beam
        return cum / max(1, len(tokens) - (tokens[-1] in stop_ids)) ** params.length_penalty

    return sorted(completed + beams, key=score, reverse=True)[:params.n]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(11)
    return [rng.integers(3, 263, n).tolist() for n in (5, 13, 9)]


def assert_matches(outputs, reference, stop_ids=frozenset()):
    assert [o.token_ids for o in outputs] == [list(tokens) for tokens, _ in reference]
    assert [o.cumulative_logprob for o in outputs] == pytest.approx([cum for _, cum in reference], abs=1e-4)
    assert [o.index for o in outputs] == list(range(len(reference)))
    assert [o.finish_reason for o in outputs] == ["stop" if t[-1] in stop_ids else "length" for t, _ in reference]
    assert all(o.new_token_ids == o.token_ids and o.logprobs is None for o in outputs)


@pytest.mark.parametrize("width,n,max_tokens,caching", [(2, 2, 6, False), (4, 3, 5, False), (4, 3, 5, True)])
def test_engine_equals_the_reference_beam_search(tiny_model, prompts, width, n, max_tokens, caching):
    params = SamplingParams(beam_width=width, n=n, max_tokens=max_tokens, **BEAM)
    engine = Engine(tiny_model, EngineConfig(enable_prefix_caching=caching, **CONFIG))
    outs = engine.generate(prompts[:2], params, progress=False)
    for prompt, out in zip(prompts, outs):
        assert out.finished and out.prompt_token_ids == prompt
        assert_matches(out.outputs, reference_beam_search(tiny_model, prompt, params))
    assert not engine.requests and engine.manager.num_used_blocks == 0
    assert (engine.manager.prefix_hits > 0) == caching  # with caching, rounds found earlier rounds' blocks


def test_stop_tokens_complete_beams_with_a_length_penalty(tiny_model, prompts):
    free = reference_beam_search(tiny_model, prompts[2], SamplingParams(beam_width=3, max_tokens=6, **BEAM))
    stop = free[0][0][2]  # the best beam's third token now ends a beam (EOS is ignored, stop ids are not)
    params = SamplingParams(beam_width=3, n=3, max_tokens=6, stop_token_ids=(stop,), length_penalty=0.5, **BEAM)
    reference = reference_beam_search(tiny_model, prompts[2], params, frozenset({stop}))
    assert any(tokens[-1] == stop for tokens, _ in reference)  # the case is exercised
    out = Engine(tiny_model, EngineConfig(**CONFIG)).generate([prompts[2]], params, progress=False)[0]
    assert_matches(out.outputs, reference, frozenset({stop}))


def greedy_reference(model, prompts, max_tokens):
    """Greedy tokens by the full forward, one argmax at a time (EOS ignored)."""
    outputs = [[] for _ in prompts]
    for _ in range(max(max_tokens)):
        for out, row in zip(outputs, next_token_logprobs(model, [p + o for p, o in zip(prompts, outputs)])):
            out.append(int(np.argmax(row)))
    return [out[:m] for out, m in zip(outputs, max_tokens)]


def test_same_beams_beside_other_requests(tiny_model, prompts):
    params = SamplingParams(beam_width=3, n=3, max_tokens=7, **BEAM)
    rng = np.random.default_rng(5)
    others = [rng.integers(3, 263, int(rng.integers(2, 20))).tolist() for _ in range(2)]
    lengths = [4, 15]
    engine = Engine(tiny_model, EngineConfig(enable_prefix_caching=True, **CONFIG))
    outs = engine.generate([others[0], prompts[0], prompts[1], others[1]],
                           [SamplingParams(max_tokens=lengths[0], **BEAM), params, params,
                            SamplingParams(max_tokens=lengths[1], **BEAM)], progress=False)
    for prompt, out in zip(prompts, outs[1:3]):
        assert_matches(out.outputs, reference_beam_search(tiny_model, prompt, params))
    assert [outs[0].outputs[0].token_ids, outs[3].outputs[0].token_ids] == greedy_reference(tiny_model, others, lengths)
    assert engine.manager.num_used_blocks == 0


def test_width_two_one_token_gives_the_top_two_first_tokens(tiny_model, prompts):
    out = Engine(tiny_model, EngineConfig(**CONFIG)).generate(
        [prompts[1]], SamplingParams(beam_width=2, n=2, max_tokens=1, **BEAM), progress=False)[0]
    row = next_token_logprobs(tiny_model, [prompts[1]])[0]
    top2 = np.argsort(-row)[:2].tolist()
    assert [o.token_ids for o in out.outputs] == [[t] for t in top2]
    assert [o.cumulative_logprob for o in out.outputs] == pytest.approx(row[top2].tolist(), abs=1e-4)


@pytest.mark.parametrize("bad,field", [
    (dict(beam_width=11), "SamplingParams.beam_width"), (dict(beam_width=2, n=3), "SamplingParams.n"),
    (dict(beam_width=2, temperature=1.0), "temperature"), (dict(beam_width=2, stop=("x",)), "SamplingParams.stop"),
    (dict(beam_width=2, logprobs=1), "SamplingParams.logprobs"),
    (dict(beam_width=2, repetition_penalty=1.5), "SamplingParams.repetition_penalty"),
    (dict(beam_width=2, length_penalty=float("nan")), "SamplingParams.length_penalty"),
    (dict(beam_width=2, max_tokens=12), "max_num_batched_tokens=40"),  # the last round: 30 + 11 > 40 tokens
])
def test_bad_beam_params_name_the_field(tiny_model, bad, field):
    engine = Engine(tiny_model, EngineConfig(**{**CONFIG, "max_num_batched_tokens": 40}))
    with pytest.raises(ValueError, match=field):
        engine.add_request(list(range(3, 33)), {**dict(temperature=0, max_tokens=4), **bad})
    assert not engine.has_unfinished() and not engine.requests


def test_eos_ends_beams_unless_ignored(tiny_model, prompts):
    engine = Engine(tiny_model, EngineConfig(**CONFIG))
    eos = engine.add_request(prompts[0], SamplingParams(beam_width=2, temperature=0, stop_token_ids=(7,)))
    ignored = engine.add_request(prompts[0], SamplingParams(beam_width=2, stop_token_ids=(7,), **BEAM))
    assert engine.requests[eos].beam.stop_token_ids == {2, 7} and engine.requests[ignored].beam.stop_token_ids == {7}
    engine.abort(eos)
    engine.abort(ignored)
    assert not engine.has_unfinished()


def test_abort_a_beam_request_mid_round_frees_everything(tiny_model, prompts):
    params = SamplingParams(beam_width=4, n=3, max_tokens=5, **BEAM)
    engine = Engine(tiny_model, EngineConfig(enable_prefix_caching=True, **{**CONFIG, "max_num_seqs": 6}))
    keep, drop = engine.add_request(prompts[0], params), engine.add_request(prompts[1], params)
    outs = [o for _ in range(2) for o in engine.step()]  # step 2 runs keep's 4 round-2 beams and 2 of drop's
    beam = engine.requests[drop].beam
    assert outs == [] and beam.round == 1 and sorted(beam.pending) == [0, 1] and len(engine.requests[drop].seqs) == 4
    engine.abort(drop)
    outs += [o for _ in range(50) for o in engine.step()]
    assert [o.request_id for o in outs] == [keep]
    assert_matches(outs[0].outputs, reference_beam_search(tiny_model, prompts[0], params))
    assert not engine.has_unfinished() and not engine.requests
    assert engine.manager.num_used_blocks == 0 and engine.manager.num_free_blocks == CONFIG["num_blocks"]
