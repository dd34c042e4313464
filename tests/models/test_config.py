"""ModelConfig: presets, validation messages, HF round trips, derived sizes."""

from __future__ import annotations

import dataclasses

import jax
import pytest

import models
from models.config import PRESETS, ModelConfig, get_preset

SMOLLM2_FIELDS = dict(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                      intermediate_size=1536, vocab_size=49152, rope_theta=1e5,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)


def test_smollm2_preset_fields():
    config = get_preset("smollm2-135m")
    assert config.name == "smollm2-135m"
    for field, value in SMOLLM2_FIELDS.items():
        assert getattr(config, field) == value, field
    assert config.q_per_kv == 3


def test_tiny_preset_is_small_gqa_untied():
    config = get_preset("tiny")
    assert config.name == "tiny"
    assert config.num_heads % config.num_kv_heads == 0 and config.q_per_kv > 1
    assert not config.tie_word_embeddings
    assert config.num_params() < 200_000  # cheap enough for every test


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["tiny"].num_layers = 4  # type: ignore[misc]


def test_get_preset_unknown_lists_allowed():
    with pytest.raises(ValueError, match="no-such-model") as err:
        get_preset("no-such-model")
    for name in PRESETS:
        assert name in str(err.value)


@pytest.mark.parametrize("changes, words", [
    ({"num_heads": 5}, ["num_heads", "num_kv_heads"]),
    ({"hidden_size": -48}, ["hidden_size"]),
    ({"num_layers": 0}, ["num_layers"]),
    ({"vocab_size": 2.5}, ["vocab_size"]),
    ({"intermediate_size": True}, ["intermediate_size"]),
    ({"head_dim": 13}, ["head_dim", "even"]),
    ({"rope_theta": -1.0}, ["rope_theta"]),
    ({"rms_norm_eps": 0.0}, ["rms_norm_eps"]),
    ({"eos_token_ids": [2]}, ["eos_token_ids", "tuple"]),
    ({"eos_token_ids": (263,)}, ["263", "vocab"]),
    ({"bos_token_id": -1}, ["-1", "vocab"]),
])
def test_validation_errors_name_the_problem(changes, words):
    with pytest.raises(ValueError) as err:
        PRESETS["tiny"].replace(**changes)
    for word in words:
        assert word in str(err.value), f"{word!r} not in {err.value}"


@pytest.mark.parametrize("changes, field", [({"eos_token_ids": (2, 300)}, "eos_token_ids"),
                                            ({"bos_token_id": 263}, "bos_token_id")])
def test_special_token_error_names_field(changes, field):
    with pytest.raises(ValueError, match=field):
        PRESETS["tiny"].replace(**changes)


@pytest.mark.parametrize("config", [
    PRESETS["smollm2-135m"], PRESETS["tiny"],
    PRESETS["tiny"].replace(eos_token_ids=(2, 7), bos_token_id=None),
    PRESETS["tiny"].replace(eos_token_ids=(), tie_word_embeddings=True, rope_theta=5e5, rms_norm_eps=1e-6),
], ids=["smollm2", "tiny", "multi-eos-no-bos", "no-eos-tied"])
def test_from_hf_round_trip(config):
    hf = config.to_hf()
    assert ModelConfig.from_hf(hf, name=config.name) == config
    assert ModelConfig.from_hf(hf.to_dict(), name=config.name) == config  # the config.json path
    assert ModelConfig.from_hf(hf).replace(name=config.name) == config


def hf_dict(**changes):
    d = PRESETS["tiny"].to_hf().to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    d.update(changes)
    return d


def test_from_hf_accepts_legacy_top_level_rope_theta():
    d = hf_dict(rope_parameters=None, rope_scaling=None, rope_theta=12345.0)
    assert ModelConfig.from_hf(d).rope_theta == 12345.0


@pytest.mark.parametrize("changes, word", [
    ({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
    ({"model_type": "qwen2"}, "qwen2"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "llama3"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
])
def test_from_hf_rejects_unsupported(changes, word):
    with pytest.raises(ValueError, match=word):
        ModelConfig.from_hf(hf_dict(**changes))


def test_kv_bytes_per_token():
    assert PRESETS["smollm2-135m"].kv_bytes_per_token(4) == 46080
    assert PRESETS["smollm2-135m"].kv_bytes_per_token(2) == 23040
    assert PRESETS["tiny"].kv_bytes_per_token(4) == 3 * 2 * 2 * 14 * 4


def leaf_count(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("tied", [False, True])
def test_num_params_matches_init_params(tied):
    config = PRESETS["tiny"].replace(tie_word_embeddings=tied)
    params = models.init_params(config)
    assert ("lm_head" in params) != tied
    assert config.num_params() == leaf_count(params)


@pytest.mark.parametrize("tied", [False, True])
def test_num_params_matches_transformers(tied):
    from transformers import LlamaForCausalLM

    config = PRESETS["tiny"].replace(tie_word_embeddings=tied)
    hf_model = LlamaForCausalLM(config.to_hf())
    # .parameters() yields a tied tensor once
    assert config.num_params() == sum(p.numel() for p in hf_model.parameters())


def test_smollm2_num_params_is_135m():
    config = PRESETS["smollm2-135m"]
    assert config.num_params() == 134_515_008
    shapes = jax.eval_shape(lambda: models.init_params(config))  # no 0.5 GB allocation
    assert config.num_params() == leaf_count(shapes)
    untied = config.replace(tie_word_embeddings=False)
    assert untied.num_params() - config.num_params() == 49152 * 576
