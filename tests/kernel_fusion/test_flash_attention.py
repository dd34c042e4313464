"""Flash-style causal prefill attention: the interpreted Pallas kernel against its dense reference
(and both against a from-scratch numpy softmax), GQA, a computed prefix (S > T), the CUDA (Triton)
lowering, and input validation. tokamax's attention is checked in test_tokamax_oracle.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_fusion.flash_attention import flash_attention, flash_attention_reference

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _inputs(batch, num_q, num_k, heads, kv_heads, dim, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (batch, num_q, heads, dim), jnp.float32).astype(dtype),
            jax.random.normal(kk, (batch, num_k, kv_heads, dim), jnp.float32).astype(dtype),
            jax.random.normal(kv, (batch, num_k, kv_heads, dim), jnp.float32).astype(dtype))


def numpy_attention(q, k, v):
    """Per (batch, head, query): softmax over the keys at or before the query's position."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, num_q, heads, dim = q.shape
    num_k, group = k.shape[1], heads // k.shape[2]
    out = np.zeros(q.shape)
    for b in range(batch):
        for n in range(heads):
            for t in range(num_q):
                visible = num_k - num_q + t + 1
                scores = k[b, :visible, n // group] @ q[b, t, n] / np.sqrt(dim)
                weights = np.exp(scores - scores.max())
                out[b, t, n] = weights @ v[b, :visible, n // group] / weights.sum()
    return out


@pytest.mark.parametrize("batch, num_q, num_k, heads, kv_heads, dim", [
    (2, 37, 37, 9, 3, 64),  # SmolLM2's heads and head_dim, a prompt that is no tile multiple
    (1, 5, 70, 6, 2, 14),  # a chunk after a computed prefix; head_dim padded inside
    (1, 1, 33, 4, 4, 32),  # one query (MHA)
    (1, 64, 64, 2, 1, 16),  # exactly two tiles
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_and_reference_match_a_numpy_softmax(batch, num_q, num_k, heads, kv_heads, dim, dtype):
    q, k, v = _inputs(batch, num_q, num_k, heads, kv_heads, dim, dtype)
    expected = numpy_attention(q, k, v)
    for got in (flash_attention(q, k, v, interpret=True), flash_attention_reference(q, k, v)):
        assert got.shape == q.shape and got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("block_q, block_k", [(16, 16), (16, 64), (64, 16)])
def test_any_tiles_give_the_same_output(block_q, block_k):
    q, k, v = _inputs(1, 50, 80, 4, 2, 32, jnp.float32, seed=3)
    np.testing.assert_allclose(flash_attention(q, k, v, interpret=True, block_q=block_q, block_k=block_k),
                               flash_attention_reference(q, k, v), atol=2e-5, rtol=2e-5)


def test_lowers_to_triton_for_cuda():
    q = jax.ShapeDtypeStruct((1, 37, 9, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 37, 3, 64), jnp.bfloat16)
    exported = jax.export.export(jax.jit(flash_attention), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(q, kv, kv)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


@pytest.mark.parametrize("fn", [flash_attention, flash_attention_reference])
@pytest.mark.parametrize("q_shape, k_shape, match", [
    ((1, 4, 6, 16), (1, 4, 2), "q must be"),
    ((1, 4, 6, 16), (1, 4, 4, 16), "heads must be a multiple of kv_heads"),
    ((1, 8, 6, 16), (1, 4, 2, 16), "S >= T"),
    ((1, 4, 6, 16), (2, 4, 2, 16), "share B and D"),
])
def test_bad_shapes_are_named(fn, q_shape, k_shape, match):
    with pytest.raises(ValueError, match=match):
        fn(jnp.zeros(q_shape), jnp.zeros(k_shape), jnp.zeros(k_shape))


def test_tiles_must_suit_tritons_dot():
    q, k, v = _inputs(1, 4, 4, 2, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match="block_k must be a power of two >= 16"):
        flash_attention(q, k, v, interpret=True, block_k=8)
