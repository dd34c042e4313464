"""The naive contiguous KV cache and its causal attention, against a slow numpy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paged_attention.contiguous import (causal_attention, contiguous_attention, get_kv_cache_shape,
                                        init_kv_cache, kv_cache_bytes, write_kv)


def head_major(x) -> jnp.ndarray:
    """[batch, tokens, kv_heads, head_dim] -> the cache's [batch, kv_heads, tokens, head_dim]."""
    return jnp.asarray(x).swapaxes(1, 2)


def attend(q, k, v, q_positions, k_positions):
    """causal_attention with token-major k/v, as the reference takes them."""
    return causal_attention(jnp.asarray(q), head_major(k), head_major(v), jnp.asarray(q_positions),
                            jnp.asarray(k_positions))


def attention_reference(q, k, v, q_positions, k_positions) -> np.ndarray:
    """Per batch / head / query: softmax over the keys at positions <= the query's; zeros if none.
    k, v token-major: [batch, k_len, kv_heads, head_dim]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    k_positions = np.broadcast_to(k_positions, (batch, k.shape[1]))
    out = np.zeros(q.shape)
    for b in range(batch):
        for h in range(num_heads):
            for t in range(q_len):
                visible = k_positions[b] <= q_positions[b, t]
                if not visible.any():
                    continue
                scores = k[b, visible, h // group] @ q[b, t, h] / np.sqrt(head_dim)
                weights = np.exp(scores - scores.max())
                out[b, t, h] = weights / weights.sum() @ v[b, visible, h // group]
    return out


def random_qkv(rng, batch, q_len, k_len, num_heads, kv_heads, head_dim):
    q = rng.standard_normal((batch, q_len, num_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, k_len, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, k_len, kv_heads, head_dim)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("num_heads, kv_heads", [(3, 3), (6, 2), (9, 3)])
def test_causal_attention_matches_reference(rng, num_heads, kv_heads):
    q, k, v = random_qkv(rng, 3, 5, 11, num_heads, kv_heads, 7)
    # shuffled, gappy key positions: the mask must follow positions, not indices
    k_positions = np.stack([rng.permutation(20)[:11] for _ in range(3)]).astype(np.int32)
    q_positions = rng.integers(0, 20, size=(3, 5)).astype(np.int32)
    q_positions[0, 0] = k_positions[0].min()  # exactly one visible key
    got = attend(q, k, v, q_positions, k_positions)
    assert got.shape == q.shape and got.dtype == jnp.float32
    expected = attention_reference(q, k, v, q_positions, k_positions)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got)[0, 0], v[0, np.argmin(k_positions[0])].repeat(
        num_heads // kv_heads, axis=0), atol=1e-6)


def test_shared_key_positions_broadcast(rng):
    q, k, v = random_qkv(rng, 2, 4, 6, 6, 2, 5)
    q_positions = np.array([[2, 3, 4, 5], [0, 1, 2, 3]], np.int32)
    k_positions = np.arange(6, dtype=np.int32)[None]  # [1, k_len]
    got = attend(q, k, v, q_positions, k_positions)
    np.testing.assert_allclose(np.asarray(got), attention_reference(q, k, v, q_positions, k_positions),
                               atol=1e-5, rtol=1e-5)


def test_query_without_visible_keys_gives_zeros(rng):
    q, k, v = random_qkv(rng, 1, 3, 4, 6, 2, 4)
    q_positions = np.array([[2, 5, 9]], np.int32)
    k_positions = np.array([[5, 6, 7, 8]], np.int32)  # query at 2 sees nothing
    got = np.asarray(attend(q, k, v, q_positions, k_positions))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[0, 0], 0.0)
    assert np.abs(got[0, 1:]).min() > 0
    np.testing.assert_allclose(got, attention_reference(q, k, v, q_positions, k_positions), atol=1e-5)


def test_bfloat16_inputs_stay_bfloat16(rng):
    q, k, v = random_qkv(rng, 2, 4, 4, 6, 2, 8)
    pos = np.broadcast_to(np.arange(4, dtype=np.int32), (2, 4))
    q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    got = causal_attention(q16, head_major(k16), head_major(v16), jnp.asarray(pos), jnp.asarray(pos))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), attention_reference(q, k, v, pos, pos), atol=5e-2)


def test_write_kv_scatters_and_drops_out_of_range(rng):
    cache = init_kv_cache(1, 2, 8, 2, 3)[0]
    k = rng.standard_normal((2, 3, 2, 3)).astype(np.float32)
    v = rng.standard_normal((2, 3, 2, 3)).astype(np.float32)
    positions = np.array([[0, 5, 8], [7, 12, 2]], np.int32)  # 8 and 12 are past max_len
    new_k, new_v = jax.jit(write_kv)(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(positions))
    expected_k, expected_v = np.zeros((2, 2, 8, 3), np.float32), np.zeros((2, 2, 8, 3), np.float32)
    for b in range(2):
        for t in range(3):
            if positions[b, t] < 8:
                expected_k[b, :, positions[b, t]] = k[b, t]
                expected_v[b, :, positions[b, t]] = v[b, t]
    np.testing.assert_array_equal(np.asarray(new_k), expected_k)
    np.testing.assert_array_equal(np.asarray(new_v), expected_v)


def test_write_kv_drops_negative_positions():
    cache = init_kv_cache(1, 1, 4, 1, 2)[0]
    ones = jnp.ones((1, 1, 1, 2))
    new_k, _ = write_kv(cache, ones, ones, jnp.asarray([[-1]], jnp.int32))
    np.testing.assert_array_equal(np.asarray(new_k), 0.0)


def test_contiguous_attention_equals_attention_over_real_keys(rng):
    """Rows with 3 and 6 cached tokens append 2 new tokens each; stale slots must not leak in."""
    batch, max_len, num_heads, kv_heads, head_dim = 2, 16, 6, 2, 5
    lengths, new = [3, 6], 2
    k_old, v_old = (rng.standard_normal((batch, max_len, kv_heads, head_dim)).astype(np.float32)
                    for _ in range(2))  # token-major; slots >= length hold stale garbage
    q, k_new, v_new = random_qkv(rng, batch, new, new, num_heads, kv_heads, head_dim)
    positions = np.array([[n, n + 1] for n in lengths], np.int32)
    out, (k_cache, v_cache) = jax.jit(contiguous_attention)(
        *map(jnp.asarray, (q, k_new, v_new)), (head_major(k_old), head_major(v_old)), jnp.asarray(positions))
    k_cache, v_cache = np.asarray(k_cache).swapaxes(1, 2), np.asarray(v_cache).swapaxes(1, 2)
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(k_cache[b, n:n + new], k_new[b])
        np.testing.assert_array_equal(v_cache[b, :n], v_old[b, :n])
        keys = np.concatenate([k_old[b, :n], k_new[b]])[None]
        values = np.concatenate([v_old[b, :n], v_new[b]])[None]
        key_pos = np.arange(n + new, dtype=np.int32)[None]
        expected = attend(q[b:b + 1], keys, values, positions[b:b + 1], key_pos)
        np.testing.assert_allclose(np.asarray(out)[b], np.asarray(expected)[0], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(out)[b], attention_reference(
            q[b:b + 1], keys, values, positions[b:b + 1], key_pos)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, itemsize", [(jnp.float32, 4), (jnp.bfloat16, 2)])
def test_init_kv_cache_shapes_and_bytes(dtype, itemsize):
    assert get_kv_cache_shape(2, 16, 3, 14) == (2, 3, 16, 14)  # [batch, kv_heads, max_len, head_dim]
    cache = init_kv_cache(5, 2, 16, 3, 14, dtype)
    assert len(cache) == 5
    for k, v in cache:
        assert k.shape == v.shape == (2, 3, 16, 14)
        assert k.dtype == v.dtype == dtype
        assert not np.asarray(k, np.float32).any()
    assert kv_cache_bytes(cache) == 5 * 2 * (2 * 16 * 3 * 14) * itemsize
