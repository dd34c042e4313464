"""Our fused kernels and references against an independent implementation: tokamax (Google's JAX
kernel library; a test extra). On CPU only its XLA implementations run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_fusion.rms_norm import fused_add_rms_norm, fused_add_rms_norm_reference
from kernel_fusion.swiglu import fused_swiglu, fused_swiglu_reference

tokamax = pytest.importorskip("tokamax", reason="the oracle tests need tokamax: pip install -e '.[test]'")
from absl import flags  # noqa: E402  (tokamax's dependency)

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # tokamax reads absl flags, which would otherwise parse pytest's argv


def _normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("shape", [(7, 576), (2, 5, 64)])
def test_rms_norm_matches_tokamax_layer_norm_without_mean(shape):
    x, residual, weight = _normal(0, shape), _normal(1, shape), 1 + _normal(2, shape[-1:], 0.1)
    expected = tokamax.layer_norm(x + residual, weight, None, epsilon=1e-5, subtract_mean=False,
                                  implementation="xla")
    for normed, summed in (fused_add_rms_norm(x, residual, weight, eps=1e-5, interpret=True),
                           fused_add_rms_norm_reference(x, residual, weight, eps=1e-5)):
        np.testing.assert_allclose(normed, expected, atol=2e-6, rtol=2e-6)
        np.testing.assert_array_equal(summed, x + residual)


@pytest.mark.parametrize("rows, hidden, inter", [(5, 576, 1536), (33, 64, 48)])
def test_swiglu_matches_tokamax_gated_linear_unit(rows, hidden, inter):
    x = _normal(0, (rows, hidden))
    weights = _normal(1, (hidden, 2, inter), hidden ** -0.5)  # tokamax's [K, 2, N]: gate, then up
    expected = tokamax.gated_linear_unit(x, weights, activation=jax.nn.swish, implementation="xla")
    w_gate_up = jnp.concatenate([weights[:, 0], weights[:, 1]], axis=1)  # ours: [K, 2N], gate columns first
    scale = float(jnp.abs(expected).max())
    for got in (fused_swiglu(x, w_gate_up, interpret=True), fused_swiglu_reference(x, w_gate_up)):
        np.testing.assert_allclose(got, expected, atol=1e-5 * scale)


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4)])
def test_flash_attention_matches_tokamax_dot_product_attention(heads, kv_heads):
    from kernel_fusion.flash_attention import flash_attention, flash_attention_reference

    q, k, v = _normal(0, (2, 37, heads, 64)), _normal(1, (2, 37, kv_heads, 64)), _normal(2, (2, 37, kv_heads, 64))
    expected = tokamax.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    for got in (flash_attention(q, k, v, interpret=True), flash_attention_reference(q, k, v)):
        np.testing.assert_allclose(got, expected, atol=2e-6, rtol=2e-6)
