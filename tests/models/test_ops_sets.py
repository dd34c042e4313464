"""The three ops sets (`unfused`: one compiled program per op; `xla`: one program per step;
`pallas`: fused kernels, interpreted on CPU) give the same logits (to f32 rounding) and the same
greedy tokens, through the model and through the engine, without editing the model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import models
from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.sampling_params import SamplingParams
from kernel_fusion.fuse_params import fuse_params, pad_intermediate
from models.ops import OPS_SETS, PallasOps, UnfusedOps


def test_prepared_params_are_fused_and_padded_to_the_kernel_tile(tiny_model):
    c = tiny_model.config
    prepared = PallasOps().prepare_params(tiny_model.params)
    padded = -(-c.intermediate_size // 16) * 16
    assert prepared["layers"][0]["w_gate_up"].shape == (c.hidden_size, 2 * padded)
    assert prepared["layers"][0]["w_down"].shape == (padded, c.hidden_size)
    assert PallasOps().prepare_params(prepared)["layers"][0]["w_gate_up"].shape == (c.hidden_size, 2 * padded)


def test_padding_the_intermediate_size_changes_no_logit(tiny_model):
    c = tiny_model.config
    tokens, positions = jnp.arange(9)[None] % c.vocab_size, jnp.arange(9)[None]
    fused = fuse_params(tiny_model.params)
    plain, _ = models.forward(fused, tokens, positions, config=c)
    padded, _ = models.forward(pad_intermediate(fused, 64), tokens, positions, config=c)
    np.testing.assert_allclose(padded, plain, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"layers\[0\] has no w_gate_up"):
        pad_intermediate(tiny_model.params, 16)


@pytest.mark.parametrize("name", ["unfused", "pallas"])
def test_same_logits_as_the_xla_set(tiny_model, name):
    c = tiny_model.config
    tokens = (jnp.arange(2 * 13).reshape(2, 13) * 5) % c.vocab_size
    positions = jnp.broadcast_to(jnp.arange(13), (2, 13))
    expected, _ = models.forward(tiny_model.params, tokens, positions, config=c)
    ops = OPS_SETS[name]
    got, _ = models.forward(ops.prepare_params(tiny_model.params), tokens, positions, config=c, ops=ops)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_same_greedy_tokens_through_the_engine(tiny_model):
    """f32: the three sets pick the same tokens (the issue's bar for kernel fusion)."""
    prompts = [[3, 1, 4, 1, 5] * k for k in (1, 2, 4)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tokens = {}
    for name in OPS_SETS:
        engine = Engine(tiny_model, EngineConfig(num_blocks=64, block_size=4, max_model_len=64, kernels=name))
        tokens[name] = [out.outputs[0].token_ids for out in engine.generate(prompts, params, progress=False)]
    assert tokens["unfused"] == tokens["xla"] == tokens["pallas"]


def test_only_the_unfused_set_runs_its_step_op_by_op(tiny_model):
    assert [ops.jit_step for ops in OPS_SETS.values()] == [False, True, True]
    with pytest.raises(ValueError, match="the unfused ops set runs on the model's separate projections"):
        UnfusedOps().prepare_params(fuse_params(tiny_model.params))


def test_unfused_params_are_a_named_error(tiny_model):
    c = tiny_model.config
    with pytest.raises(ValueError, match="the pallas ops set runs on fused params"):
        models.forward(tiny_model.params, jnp.zeros((1, 3), jnp.int32), jnp.arange(3)[None], config=c, ops=PallasOps())
