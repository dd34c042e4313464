"""SamplingParams: vLLM-style defaults, and every bad value rejected with the field and its range."""

from __future__ import annotations

import pytest

from continuous_batching.sampling_params import SamplingParams


def test_defaults_follow_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_k, p.top_p, p.max_tokens, p.beam_width, p.length_penalty) == \
        (1, 1.0, 0, 1.0, 16, 1, 1.0)
    assert not p.greedy and SamplingParams(temperature=0).greedy


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "SamplingParams.n must be an int >= 1, got 0"),
    ({"temperature": -0.5}, "SamplingParams.temperature must be a number >= 0"),
    ({"temperature": float("nan")}, "SamplingParams.temperature must be a number >= 0"),
    ({"top_k": -1}, "SamplingParams.top_k must be an int >= 0 (0 = off)"),
    ({"top_p": 0.0}, "SamplingParams.top_p must be a number in (0, 1]"),
    ({"top_p": 1.5}, "SamplingParams.top_p must be a number in (0, 1]"),
    ({"repetition_penalty": 0}, "SamplingParams.repetition_penalty must be a number > 0"),
    ({"presence_penalty": 3}, "SamplingParams.presence_penalty must be a number in [-2, 2]"),
    ({"frequency_penalty": -2.5}, "SamplingParams.frequency_penalty must be a number in [-2, 2]"),
    ({"stop_token_ids": [2]}, "SamplingParams.stop_token_ids must be a tuple of token ids >= 0"),
    ({"stop_token_ids": (2, -1)}, "SamplingParams.stop_token_ids must be a tuple of token ids >= 0"),
    ({"stop": ("",)}, "SamplingParams.stop must be a tuple of non-empty strings"),
    ({"max_tokens": 0}, "SamplingParams.max_tokens must be an int >= 1"),
    ({"max_tokens": True}, "SamplingParams.max_tokens must be an int >= 1"),
    ({"seed": 1.5}, "SamplingParams.seed must be None or an int"),
    ({"logprobs": 21}, "SamplingParams.logprobs must be None or an int in [0, 20]"),
    ({"ignore_eos": 1}, "SamplingParams.ignore_eos must be a bool"),
    ({"beam_width": 0}, "SamplingParams.beam_width must be an int in [1, 10]"),
    ({"beam_width": 11, "temperature": 0}, "SamplingParams.beam_width must be an int in [1, 10]"),
    ({"beam_width": 4}, "beam search) needs temperature=0"),
    ({"beam_width": 2, "temperature": 0, "n": 3}, "SamplingParams.n (3) must be <= beam_width (2)"),
    ({"length_penalty": float("inf")}, "SamplingParams.length_penalty must be a finite number"),
    ({"length_penalty": "1"}, "SamplingParams.length_penalty must be a finite number"),
    ({"beam_width": 2, "temperature": 0, "repetition_penalty": 1.2},
     "SamplingParams.repetition_penalty must be 1 (off) with beam search"),
    ({"beam_width": 2, "temperature": 0, "presence_penalty": 0.5},
     "SamplingParams.presence_penalty must be 0 (off) with beam search"),
    ({"beam_width": 2, "temperature": 0, "frequency_penalty": -0.5},
     "SamplingParams.frequency_penalty must be 0 (off) with beam search"),
    ({"beam_width": 2, "temperature": 0, "stop": ("x",)}, "SamplingParams.stop must be () (use stop_token_ids)"),
    ({"beam_width": 2, "temperature": 0, "logprobs": 2}, "SamplingParams.logprobs must be None (beams return"),
])
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert message in str(err.value)


def test_valid_combinations():
    SamplingParams(n=4, temperature=0.7, top_k=50, top_p=0.9, seed=3, stop=("\n\n",), logprobs=5)
    SamplingParams(beam_width=4, n=2, temperature=0)
    SamplingParams(beam_width=10, n=10, temperature=0, length_penalty=0.6, stop_token_ids=(2,), ignore_eos=True)
    SamplingParams(length_penalty=-1.5)  # beam search only; ignored otherwise


def test_from_dict():
    p = SamplingParams.from_dict({"max_tokens": 8, "stop": ["END"], "stop_token_ids": [7]})
    assert p.stop == ("END",) and p.stop_token_ids == (7,) and p.max_tokens == 8
    with pytest.raises(ValueError, match=r"unknown sampling parameter\(s\) \['max_new_tokens'\]; allowed: \['n', "):
        SamplingParams.from_dict({"max_new_tokens": 8})
