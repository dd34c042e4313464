"""The batch-1 matmul benchmark computes the model's projections in model order (tiny preset)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import models
from experiments.matvec_chain import PROJECTIONS, blockwise_int8_matmul, independent_matvecs, weight_matmuls
from quantization.weight_only import quantize_weight


def test_weight_matmuls_follow_the_model_order():
    params = models.load("tiny").params
    layers = [{name: layer[name] for name in PROJECTIONS} for layer in params["layers"]]
    x = np.random.default_rng(0).standard_normal((2, params["embed"].shape[1])).astype(np.float32)
    h = x.astype(np.float64)
    for layer in layers:
        w = {name: np.asarray(a, np.float64) for name, a in layer.items()}
        o = h @ w["wq"] @ w["wo"]
        gate, up = o @ w["w_gate"], o @ w["w_up"]
        h = h + (gate / (1 + np.exp(-gate)) * up) @ w["w_down"]
    expected = h @ np.asarray(params["embed"], np.float64).T
    np.testing.assert_allclose(np.asarray(weight_matmuls(jnp.asarray(x), layers, params["embed"])), expected,
                               rtol=1e-4, atol=1e-4)


def test_independent_matvecs_multiply_each_weight():
    weights = [jnp.full((3, 4), float(i)) for i in range(3)]
    out = independent_matvecs(jnp.ones((1, 3)), weights)
    assert [np.asarray(o).tolist() for o in out] == [[[3.0 * i] * 4] for i in range(3)]


def test_blockwise_int8_matmul_is_the_grouped_weight_times_int8_rounded_activations():
    rng = np.random.default_rng(1)
    w = quantize_weight(jnp.asarray(rng.standard_normal((96, 40)), jnp.float32), 8, 32)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    x[1] = 0.0  # an all-zero token keeps scale 1
    got = np.asarray(blockwise_int8_matmul(jnp.asarray(x), w))
    dense = np.asarray(w.dequantize(jnp.float32), np.float64)
    # the same product with each token's 32-wide groups rounded to int8 by hand
    groups = x.reshape(3, 3, 32).astype(np.float64)
    scale = np.abs(groups).max(-1, keepdims=True) / 127.0
    rounded = (np.round(groups / np.where(scale > 0, scale, 1)) * scale).reshape(3, 96)
    np.testing.assert_allclose(got, rounded @ dense, rtol=1e-4, atol=1e-4)
    assert np.abs(got - x @ dense).max() < 0.02 * np.abs(x @ dense).max()
    np.testing.assert_allclose(np.asarray(blockwise_int8_matmul(jnp.asarray(x[:1]), w)), got[:1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="symmetric 8-bit codes in whole groups"):
        blockwise_int8_matmul(jnp.asarray(x), quantize_weight(jnp.ones((96, 40)), 4, 32))
