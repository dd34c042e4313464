"""The naive KV cache: one contiguous `[batch, kv_heads, max_len, head_dim]` buffer per layer.

This is what HF transformers (static cache) and FasterTransformer do: every sequence in the batch
reserves `max_len` slots up front, whether it will use them or not. It is the baseline PagedAttention
is measured against (see `paged_attention/` for the paged layout).

Rows are addressed by token *position*: the token at position p of row b lives in slot `[b, :, p]`.
The head-major layout (as HF's cache) makes each (row, kv head) a contiguous `[max_len, head_dim]`
matrix, so attention is one batched GEMM (2.3x faster on CPU than token-major at batch 8).
A query at position p attends to every slot <= p of its row. Padding needs no special mask: pad
tokens sit at positions past a row's real length, so real queries never see them, and the next real
token written at that position overwrites them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LayerCache = tuple[jax.Array, jax.Array]  # (k, v), each [batch, kv_heads, max_len, head_dim]


def get_kv_cache_shape(batch_size: int, max_len: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """Shape of one layer's K (or V) buffer in the contiguous layout."""
    return (batch_size, num_kv_heads, max_len, head_dim)


def init_kv_cache(num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                  dtype=jnp.float32) -> list[LayerCache]:
    """Zeroed per-layer (k, v) buffers; a list so each layer's buffer can be updated in place."""
    shape = get_kv_cache_shape(batch_size, max_len, num_kv_heads, head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)]


def kv_cache_bytes(cache: list[LayerCache]) -> int:
    """Bytes the cache reserves on the device."""
    return sum(k.nbytes + v.nbytes for k, v in cache)


def write_kv(layer_cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
    """Scatter new keys/values into their rows' slots.

    k, v: [batch, tokens, kv_heads, head_dim]; positions: i32[batch, tokens]. Positions outside
    `[0, max_len)` (negative ones included) are dropped.
    """
    k_cache, v_cache = layer_cache
    rows = jnp.arange(k.shape[0])[:, None]  # i32[batch, 1]
    positions = jnp.where(positions < 0, k_cache.shape[2], positions)  # negative: dropped, not wrapped
    # cache[rows, :, positions] has shape [batch, tokens, kv_heads, head_dim], like k and v
    k_cache = k_cache.at[rows, :, positions].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows, :, positions].set(v.astype(v_cache.dtype), mode="drop")
    return k_cache, v_cache


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                     k_positions: jax.Array) -> jax.Array:
    """Grouped-query attention where a query sees the keys at positions <= its own.

    q: [batch, q_len, num_heads, head_dim]; k, v: [batch, kv_heads, k_len, head_dim] (head-major);
    q_positions: i32[batch, q_len]; k_positions: i32[batch, k_len] (or [1, k_len]).
    Returns [batch, q_len, num_heads, head_dim] in q's dtype. Softmax is computed in f32.
    """
    batch, q_len, num_heads, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = num_heads // kv_heads
    # The query heads sharing a KV head, times the query tokens, form one GEMM operand per (row, kv head).
    q = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, group * q_len, head_dim)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(batch, kv_heads, group, q_len, k_len) / math.sqrt(head_dim)
    visible = (k_positions[:, None, :] <= q_positions[:, :, None])[:, None, None]  # bool[b, 1, 1, q, k]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    # A query that sees nothing (only padding rows can) would give NaN; make it zero instead.
    probs = jnp.where(visible.any(-1, keepdims=True), probs, 0.0)
    probs = probs.reshape(batch, kv_heads, group * q_len, k_len).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v, preferred_element_type=jnp.float32)
    out = out.reshape(batch, kv_heads, group, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


def contiguous_attention(q: jax.Array, k: jax.Array, v: jax.Array, layer_cache: LayerCache,
                         positions: jax.Array) -> tuple[jax.Array, LayerCache]:
    """Write this step's k/v into the cache, then attend over the whole reserved buffer.

    q: [batch, tokens, num_heads, head_dim]; k, v: [batch, tokens, kv_heads, head_dim] (this step's,
    token-major as the projections produce them); positions: i32[batch, tokens]. Attending over all `max_len` slots (masked) is exactly the
    waste the naive cache pays; PagedAttention reads only the real context.
    """
    layer_cache = write_kv(layer_cache, k, v, positions)
    k_cache, v_cache = layer_cache
    slot_positions = jnp.arange(k_cache.shape[2], dtype=positions.dtype)[None, :]  # i32[1, max_len]
    out = causal_attention(q, k_cache, v_cache, positions, slot_positions)
    return out, layer_cache
