"""`fuse_params`: the fused weight layout (wqkv, w_gate_up) is a params transformation the model
reads through its ops seam, with the same logits and the same greedy tokens through the engine."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import models
from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.sampling_params import SamplingParams
from kernel_fusion.fuse_params import fuse_params, unfuse_params
from quantization.quantized_tensor import QuantizedTensor


def test_fused_layers_hold_the_concatenated_weights(tiny_model):
    c = tiny_model.config
    fused = fuse_params(tiny_model.params)
    layer, original = fused["layers"][0], tiny_model.params["layers"][0]
    assert sorted(layer) == ["attn_norm", "mlp_norm", "w_down", "w_gate_up", "wo", "wqkv"]
    assert layer["wqkv"].shape == (c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim)
    assert layer["w_gate_up"].shape == (c.hidden_size, 2 * c.intermediate_size)
    assert fused["embed"] is tiny_model.params["embed"]  # untouched leaves are shared, not copied
    assert "wq" in original  # the input is not modified
    back = unfuse_params(fused, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim)
    for name, weight in original.items():
        np.testing.assert_array_equal(back["layers"][0][name], weight)


def test_same_logits_through_the_model(tiny_model):
    c = tiny_model.config
    tokens = (jnp.arange(2 * 11).reshape(2, 11) * 7) % c.vocab_size
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    plain, _ = models.forward(tiny_model.params, tokens, positions, config=c)
    fused, _ = models.forward(fuse_params(tiny_model.params), tokens, positions, config=c)
    np.testing.assert_allclose(fused, plain, atol=1e-5, rtol=1e-5)


def test_same_greedy_tokens_through_the_engine(tiny_model):
    prompts = [[5, 9, 2, 7] * k for k in (1, 3, 5)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    config = EngineConfig(num_blocks=64, block_size=4, max_model_len=64)
    tokens = {}
    for name, model in (("plain", tiny_model),
                        ("fused", dataclasses.replace(tiny_model, params=fuse_params(tiny_model.params)))):
        outputs = Engine(model, config).generate(prompts, params, progress=False)
        tokens[name] = [out.outputs[0].token_ids for out in outputs]
    assert tokens["fused"] == tokens["plain"]


def test_refuses_what_it_cannot_fuse(tiny_model):
    fused = fuse_params(tiny_model.params)
    with pytest.raises(ValueError, match=r"layers\[0\] has no \['wq', 'wk', 'wv'\] to fuse into 'wqkv' \(already fused\?\)"):
        fuse_params(fused)
    layer = dict(tiny_model.params["layers"][0])
    layer["wq"] = QuantizedTensor.__new__(QuantizedTensor)  # any quantized leaf
    with pytest.raises(ValueError, match=r"fuse plain arrays, then quantize"):
        fuse_params({**tiny_model.params, "layers": [layer]})
