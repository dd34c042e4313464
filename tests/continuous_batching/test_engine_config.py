"""Orthogonal engine settings: the named policies are presets over admission, KV memory and chunked
prefill; a combination no preset names runs too, and still gives every request its greedy
reference tokens."""

from __future__ import annotations

import numpy as np
import pytest

import models
from continuous_batching.engine import Engine
from continuous_batching.engine_config import POLICIES, EngineConfig
from continuous_batching.sampling_params import SamplingParams

SMALL = dict(num_blocks=40, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_each_policy_is_a_preset(policy):
    config = EngineConfig(policy=policy)
    assert config.settings == POLICIES[policy].settings and config.name == policy
    admission, kv_memory, chunked = POLICIES[policy].settings
    same = EngineConfig(admission=admission, kv_memory=kv_memory, chunked_prefill=chunked)
    assert same.name == policy and same.paged == config.paged


def test_unset_settings_default_to_continuous():
    assert EngineConfig().name == "continuous"
    assert EngineConfig(chunked_prefill=True).name == "chunked_prefill"
    assert EngineConfig(admission="batch", kv_memory="paged").name == "batch+paged"


@pytest.mark.parametrize("settings,field", [
    (dict(policy="static", kv_memory="paged"), "kv_memory"),
    (dict(policy="continuous", chunked_prefill=True), "chunked_prefill"),
    (dict(admission="rolling"), "admission"),
    (dict(kv_memory="contiguous"), "kv_memory"),
    (dict(admission="batch", chunked_prefill=True), "chunked_prefill"),
    (dict(kv_memory="reserved", enable_prefix_caching=True), "enable_prefix_caching"),
])
def test_conflicting_or_unknown_settings_name_the_field(settings, field):
    with pytest.raises(ValueError, match=f"EngineConfig.{field} must be"):
        EngineConfig(**settings)


@pytest.mark.parametrize("settings", [
    dict(admission="batch", kv_memory="paged"),  # static batches on pages (the paged static engine)
    dict(kv_memory="reserved", chunked_prefill=True, reservation="oracle"),  # Orca memory, chunked prompts
])
def test_combinations_no_preset_names_give_the_reference_tokens(tiny_model, settings):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 263, int(n)).tolist() for n in rng.integers(2, 30, 7)]
    reference = models.generate(tiny_model, prompts, max_new_tokens=9, ignore_eos=True)
    engine = Engine(tiny_model, EngineConfig(**SMALL, **settings))
    outputs = engine.generate(prompts, SamplingParams(max_tokens=9, temperature=0, ignore_eos=True), progress=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert engine.manager.num_free_blocks == SMALL["num_blocks"]
