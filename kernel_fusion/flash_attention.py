"""Flash-style causal attention for prefill (FlashAttention-2's algorithm): the softmax is computed
online over key tiles, so the [queries, keys] score matrix never exists in memory.

    out = flash_attention(q, k, v)     # q [B, T, heads, D]; k, v [B, S, kv_heads, D]; S >= T

Causal with the queries as the last T of the S key positions (query t sits at position S - T + t),
so a prompt chunk whose prefix is already computed attends to that prefix and causally to itself.
GQA: query head n reads KV head n // (heads / kv_heads). Scores and softmax in f32, output in q's
dtype, scale 1 / sqrt(D).

Kernel design (Triton-lowered Pallas, tested in interpret mode on CPU): grid `(B, heads,
cdiv(T, block_q))`; a program holds one query tile `[block_q, D_pad]` of one head and walks the
key tiles `[block_k, D_pad]` of its KV head up to the last one its causal window reaches, keeping a
running max `m`, running sum `l` and an f32 accumulator (FlashAttention-2: rescale the accumulator
when the max grows, divide by `l` once at the end). Key positions past S or after the query's
position get score -inf, and V rows past S are zeroed (the wrapper pads with zeros; the mask
keeps the kernel right whatever the padding holds). The wrapper
pads T and S to the tiles and D to a power of two >= 16 (Triton's dot), and moves heads before
tokens so each program's rows are contiguous. Triton rather than Mosaic GPU for the reasons given
in `rms_norm.py`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q must be [B, T, heads, D] and k, v [B, S, kv_heads, D] (equal); got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    (batch, num_q, heads, dim), (kbatch, num_k, kv_heads, kdim) = q.shape, k.shape
    if kbatch != batch or kdim != dim or heads % kv_heads or num_k < num_q:
        raise ValueError(f"q {q.shape} and k {k.shape} must share B and D, heads must be a multiple of kv_heads, "
                         f"and S >= T (queries are the last T key positions)")


def _kernel(q_ref, k_ref, v_ref, out_ref, *, num_q: int, num_k: int, block_k: int, scale: float):
    block_q = q_ref.shape[0]
    q = q_ref[...]  # [block_q, D_pad]
    q_pos = num_k - num_q + pl.program_id(2) * block_q + jnp.arange(block_q)  # i32[block_q]
    last_key = jnp.minimum(num_k, num_k - num_q + (pl.program_id(2) + 1) * block_q)  # keys this tile can see

    def body(j, carry):
        acc, m, l = carry
        k_pos = j * block_k + jnp.arange(block_k)  # i32[block_k]
        k = k_ref[pl.ds(j * block_k, block_k), :].astype(q.dtype)  # [block_k, D_pad]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < num_k)  # bool[block_q, block_k]
        scores = jnp.where(visible, pltriton.dot(q, k, trans_b=True) * scale, -jnp.inf)  # f32[block_q, block_k]
        v = jnp.where((k_pos < num_k)[:, None], v, jnp.zeros_like(v)).astype(q.dtype)  # padding may be NaN
        m_new = jnp.maximum(m, scores.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row that sees nothing yet stays at zero
        p = jnp.exp(scores - m_safe[:, None])
        correction = jnp.exp(jnp.where(m == -jnp.inf, -jnp.inf, m - m_safe))
        acc = correction[:, None] * acc + pltriton.dot(p.astype(q.dtype), v)
        return acc, m_new, correction * l + p.sum(axis=1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, _, l = jax.lax.fori_loop(0, pl.cdiv(last_key, block_k), body, init)
    out_ref[...] = (acc / jnp.where(l == 0, 1.0, l)[:, None]).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_q", "block_k", "num_warps", "num_stages"))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False, block_q: int = 32,
                    block_k: int = 32, num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """Causal GQA attention of q [B, T, heads, D] over k, v [B, S, kv_heads, D] (queries are the last
    T key positions): [B, T, heads, D] in q's dtype. block_q, block_k: powers of two >= 16."""
    _check_inputs(q, k, v)
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (Triton's dot), got {size}")
    batch, num_q, heads, dim = q.shape
    num_k, kv_heads = k.shape[1], k.shape[2]
    group, dim_pad = heads // kv_heads, max(16, pl.next_power_of_2(dim))
    q_pad, k_pad = pl.cdiv(num_q, block_q) * block_q, pl.cdiv(num_k, block_k) * block_k
    # heads before tokens: [B, heads, T_pad, D_pad] and [B, kv_heads, S_pad, D_pad]
    qh = jnp.pad(q.swapaxes(1, 2), ((0, 0), (0, 0), (0, q_pad - num_q), (0, dim_pad - dim)))
    kh, vh = (jnp.pad(x.swapaxes(1, 2), ((0, 0), (0, 0), (0, k_pad - num_k), (0, dim_pad - dim))) for x in (k, v))
    kv_block = pl.BlockSpec((None, None, k_pad, dim_pad), lambda b, n, i: (b, n // group, 0, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, num_q=num_q, num_k=num_k, block_k=block_k, scale=1.0 / math.sqrt(dim)),
        grid=(batch, heads, q_pad // block_q),
        in_specs=[pl.BlockSpec((None, None, block_q, dim_pad), lambda b, n, i: (b, n, i, 0)), kv_block, kv_block],
        out_specs=pl.BlockSpec((None, None, block_q, dim_pad), lambda b, n, i: (b, n, i, 0)),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="flash_attention",
    )(qh, kh, vh)
    return out[:, :, :num_q, :dim].swapaxes(1, 2)


@functools.partial(jax.jit, static_argnames=("interpret", "block_q", "block_k", "num_warps", "num_stages"))
def flash_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False,
                              block_q: int = 32, block_k: int = 32, num_warps: int = 4,
                              num_stages: int = 2) -> jax.Array:
    """Dense causal GQA attention with a plain f32 softmax, same signature (tuning arguments ignored)."""
    del interpret, block_q, block_k, num_warps, num_stages
    _check_inputs(q, k, v)
    batch, num_q, heads, dim = q.shape
    num_k, kv_heads = k.shape[1], k.shape[2]
    qg = q.reshape(batch, num_q, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(dim)
    causal = jnp.arange(num_k)[None, :] <= (num_k - num_q + jnp.arange(num_q))[:, None]  # bool[T, S]
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))
    return out.reshape(batch, num_q, heads, dim).astype(q.dtype)
