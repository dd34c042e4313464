"""The batch-1 matmul benchmark computes the model's projections in model order (tiny preset)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import models
from experiments.matvec_chain import PROJECTIONS, independent_matvecs, weight_matmuls


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
