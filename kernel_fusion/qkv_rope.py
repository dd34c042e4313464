"""Fused QKV projection + RoPE + paged KV-cache write (FasterTransformer's fused QKV with
transpose, vLLM's merged `QKVParallelLinear` + `rotary_embedding` + `reshape_and_cache`).

    q, k_cache, v_cache = fused_qkv_rope(x, w_qkv, cos, sin, k_cache, v_cache, slot_mapping,
                                         num_heads=9, num_kv_heads=3)
    # q: RoPE(x @ w_q) [tokens, heads, head_dim]; RoPE(x @ w_k) and x @ w_v written to their slots

Unfused, a layer runs three matmuls that each read x, writes q, k and v, reads q and k back to
rotate them and writes them again, then reads k and v once more to scatter them into the cache.
Fused, each program reads x once per head tile, rotates in registers and writes each result once:
q to its output, k and v straight into their cache slots (nothing but q leaves the kernel).

`w_qkv` is `[hidden, (heads + 2 kv_heads) * head_dim]`: the q, k and v columns side by side
(`kernel_fusion.fuse_params`). cos / sin are f32 `[tokens, head_dim]` in the rotate-half layout
(both halves of a row hold the same angles, as `models.ops.rope_cos_sin` makes them). The caches are
one layer's paged K and V, `[kv_heads, num_blocks, block_size, head_dim]`; slot s is block
`s // block_size`, offset `s % block_size`, and a negative slot (a padding token) writes nothing.

Kernel design (Triton-lowered Pallas, tested in interpret mode on CPU): grid `(cdiv(tokens,
block_rows), heads + 2 kv_heads)`; program (i, j) owns `block_rows` tokens and one head's
`head_dim` columns, taken as two half-head tiles read from the weight as `[block_k, tile]` chunks
while it walks the hidden dimension. Rotate-half RoPE pairs column c with c + head_dim / 2, so with
the two halves as separate accumulators the rotation is elementwise in the epilogue:
`out_1 = a_1 cos - a_2 sin`, `out_2 = a_2 cos + a_1 sin`. Heads j < heads store q; the next
kv_heads rotate and scatter k, the last kv_heads scatter v unrotated. The scatter indexes the cache
(viewed `[kv_heads, num_slots, head_dim]`) with the tile's slot vector and masks padding rows; the
caches are aliased to the outputs, so under the caller's buffer donation they are updated in place.
Triton's dot needs power-of-two tiles >= 16 in every dimension: rows are padded to block_rows,
hidden is walked in power-of-two chunks that divide it, and a half head is loaded into a tile of
max(16, next power of two) columns with the columns past head_dim / 2 masked to zero (64-wide
heads fill their tiles exactly; the test model's 14-wide heads do not). Triton rather than Mosaic
GPU for the reasons given in `rms_norm.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernel_fusion.swiglu import largest_pow2_divisor


def _cache_value(x: jax.Array, dtype) -> jax.Array:
    """x as stored in a cache of `dtype` (the rule `paged_attention.kv_cache` writes by, which this
    package may not import): FP8 saturates at its largest finite value instead of overflowing to
    NaN, int8 rounds to the nearest code (halves up) and saturates at +-127, floats cast."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        return jnp.clip(jnp.floor(x + 0.5), -127.0, 127.0).astype(dtype)
    if jnp.finfo(dtype).bits == 8:
        limit = float(jnp.finfo(dtype).max)
        x = jnp.clip(x, -limit, limit)
    return x.astype(dtype)


def _check_inputs(x, w_qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be [tokens, hidden], got {x.shape}")
    tokens, hidden = x.shape
    if k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [kv_heads, num_blocks, block_size, head_dim]; got "
                         f"{k_cache.shape} and {v_cache.shape}")
    head_dim = k_cache.shape[-1]
    if k_cache.shape[0] != num_kv_heads:
        raise ValueError(f"k_cache has {k_cache.shape[0]} kv heads, num_kv_heads is {num_kv_heads}")
    cols = (num_heads + 2 * num_kv_heads) * head_dim
    if w_qkv.shape != (hidden, cols):
        raise ValueError(f"w_qkv must be [hidden, (num_heads + 2 num_kv_heads) * head_dim] = {(hidden, cols)}, "
                         f"got {w_qkv.shape}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (tokens, head_dim):
            raise ValueError(f"{name} must be [tokens, head_dim] = {(tokens, head_dim)}, got {table.shape}")
    if slot_mapping.shape != (tokens,):
        raise ValueError(f"slot_mapping must be [tokens] = ({tokens},), got {slot_mapping.shape}")


def _kernel(x_ref, w_ref, cos_ref, sin_ref, slot_ref, k_in, v_in, q_ref, k_ref, v_ref, *,
            num_heads: int, num_kv_heads: int, head_dim: int, block_k: int, tile: int):
    del k_in, v_in  # aliased to k_ref / v_ref: the caches are written in place
    block_rows, half = x_ref.shape[0], head_dim // 2
    i, j = pl.program_id(0), pl.program_id(1)
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1)  # a half-head tile, padded to `tile` columns
    ks = jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
    in_half = jnp.broadcast_to(cols < half, (block_k, tile))

    def body(c, carry):
        lo, hi = carry
        x = x_ref[:, pl.ds(c * block_k, block_k)]  # [block_rows, block_k]
        rows = c * block_k + ks
        w_lo = pltriton.load(w_ref.at[rows, j * head_dim + cols], mask=in_half, other=0)  # [block_k, tile]
        w_hi = pltriton.load(w_ref.at[rows, j * head_dim + half + cols], mask=in_half, other=0)
        lo += pltriton.dot(x, w_lo.astype(x.dtype))  # f32[block_rows, tile]
        hi += pltriton.dot(x, w_hi.astype(x.dtype))
        return lo, hi

    zeros = jnp.zeros((block_rows, tile), jnp.float32)
    lo, hi = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, body, (zeros, zeros))
    tokens = i * block_rows + jax.lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)
    in_tile = jnp.broadcast_to(cols < half, (block_rows, tile))
    # f32[block_rows, tile]: the two halves of a row hold the same angles
    cos = pltriton.load(cos_ref.at[tokens, cols], mask=in_tile, other=0.0)
    sin = pltriton.load(sin_ref.at[tokens, cols], mask=in_tile, other=0.0)
    rot_lo, rot_hi = lo * cos - hi * sin, hi * cos + lo * sin

    @pl.when(j < num_heads)
    def _():
        for start, part in ((0, rot_lo), (half, rot_hi)):
            pltriton.store(q_ref.at[tokens, j * head_dim + start + cols], part.astype(q_ref.dtype), mask=in_tile)

    slots = slot_ref[...][:, None]  # i32[block_rows, 1]; negative: a padding token
    write = in_tile & (slots >= 0)
    slots = jnp.where(slots < 0, k_ref.shape[1], slots)  # out of range and masked: never written

    def scatter(cache_ref, head, first, second):  # each row to its slot
        for start, part in ((0, first), (half, second)):
            pltriton.store(cache_ref.at[head, slots, start + cols], _cache_value(part, cache_ref.dtype), mask=write)

    @pl.when((j >= num_heads) & (j < num_heads + num_kv_heads))
    def _():
        scatter(k_ref, j - num_heads, rot_lo, rot_hi)

    @pl.when(j >= num_heads + num_kv_heads)
    def _():
        scatter(v_ref, j - num_heads - num_kv_heads, lo, hi)


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "interpret", "block_rows",
                                             "num_warps", "num_stages"))
def fused_qkv_rope(x, w_qkv, cos, sin, k_cache, v_cache, slot_mapping, *, num_heads: int, num_kv_heads: int,
                   interpret: bool = False, block_rows: int = 16, num_warps: int = 4, num_stages: int = 2):
    """(q [tokens, num_heads, head_dim] with RoPE, k_cache, v_cache with this step's rotated keys and
    values written to `slot_mapping`) for x [tokens, hidden] in x's dtype, accumulated in f32.
    block_rows: a power of two >= 16 (Triton's dot)."""
    _check_inputs(x, w_qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads)
    if block_rows < 16 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two >= 16 (Triton's dot), got {block_rows}")
    tokens, hidden = x.shape
    head_dim = k_cache.shape[-1]
    block_k, tile = largest_pow2_divisor(hidden, 64), max(16, pl.next_power_of_2(head_dim // 2))
    if block_k < 16 or head_dim % 2:
        raise ValueError(f"hidden ({hidden}) must be a multiple of 16 (Triton's dot) and head_dim ({head_dim}) even")
    rows_pad = pl.cdiv(max(tokens, 1), block_rows) * block_rows
    pad = rows_pad - tokens
    x = jnp.pad(x, ((0, pad), (0, 0)))
    cos, sin = (jnp.pad(t.astype(jnp.float32), ((0, pad), (0, 0))) for t in (cos, sin))
    slots = jnp.pad(slot_mapping.astype(jnp.int32), (0, pad), constant_values=-1)
    cache_shape = k_cache.shape
    flat_shape = (cache_shape[0], cache_shape[1] * cache_shape[2], head_dim)  # [kv_heads, slots, head_dim]
    whole = pl.BlockSpec(memory_space=pl.ANY)  # a ref to the whole array, indexed in the kernel
    q, k_flat, v_flat = pl.pallas_call(
        functools.partial(_kernel, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          block_k=block_k, tile=tile),
        grid=(rows_pad // block_rows, num_heads + 2 * num_kv_heads),
        in_specs=[pl.BlockSpec((block_rows, hidden), lambda i, j: (i, 0)),  # x rows, whole
                  whole, whole, whole, pl.BlockSpec((block_rows,), lambda i, j: (i,)), whole, whole],
        out_specs=[whole, whole, whole],
        out_shape=[jax.ShapeDtypeStruct((rows_pad, num_heads * head_dim), x.dtype),
                   jax.ShapeDtypeStruct(flat_shape, k_cache.dtype), jax.ShapeDtypeStruct(flat_shape, v_cache.dtype)],
        input_output_aliases={5: 1, 6: 2},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fused_qkv_rope",
    )(x, w_qkv, cos, sin, slots, k_cache.reshape(flat_shape), v_cache.reshape(flat_shape))
    return (q[:tokens].reshape(tokens, num_heads, head_dim), k_flat.reshape(cache_shape),
            v_flat.reshape(cache_shape))


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "interpret", "block_rows",
                                             "num_warps", "num_stages"))
def fused_qkv_rope_reference(x, w_qkv, cos, sin, k_cache, v_cache, slot_mapping, *, num_heads: int,
                             num_kv_heads: int, interpret: bool = False, block_rows: int = 16,
                             num_warps: int = 4, num_stages: int = 2):
    """Pure jnp, same signature (tuning arguments ignored): one matmul, rotate-half RoPE, a scatter."""
    del interpret, block_rows, num_warps, num_stages
    _check_inputs(x, w_qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads)
    tokens, head_dim = x.shape[0], k_cache.shape[-1]
    qkv = jnp.matmul(x, w_qkv.astype(x.dtype), preferred_element_type=jnp.float32)
    qkv = qkv.reshape(tokens, num_heads + 2 * num_kv_heads, head_dim)  # f32[tokens, all heads, head_dim]
    half = head_dim // 2
    rotated = jnp.concatenate([-qkv[..., half:], qkv[..., :half]], axis=-1)
    roped = qkv * cos[:, None, :] + rotated * sin[:, None, :]
    q, k = roped[:, :num_heads], roped[:, num_heads:num_heads + num_kv_heads]
    v = qkv[:, num_heads + num_kv_heads:]
    num_slots = k_cache.shape[1] * k_cache.shape[2]
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)  # negative: dropped

    def scatter(cache, new):  # new: f32[tokens, kv_heads, head_dim]
        flat = cache.reshape(num_kv_heads, num_slots, head_dim)
        flat = flat.at[:, slots].set(_cache_value(new.swapaxes(0, 1), cache.dtype), mode="drop")
        return flat.reshape(cache.shape)

    return q.astype(x.dtype), scatter(k_cache, k), scatter(v_cache, v)
