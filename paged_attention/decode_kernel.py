"""Paged-attention decode: one new query token per sequence attends to its pages in the KV cache.

The KV cache is `[num_kv_heads, num_blocks, block_size, head_dim]` per layer (`kv_cache.py`). A
sequence's keys live in the blocks its block-table row names, in order; only the first
`context_lens[s]` tokens are real (the current token's K/V is already written). Every other slot
and every block no table names may hold anything, NaN included.

Kernel design (written for GPU, i.e. Triton-lowered Pallas; tested in interpret mode on CPU):
- grid `(num_seqs, num_kv_heads)`: one program per (sequence, KV head) handles all the query heads
  sharing that KV head (GQA), so each page is read from memory once per group, not once per q head.
- The group's query heads form the M dimension of two `plgpu.dot`s (scores = q k^T, out = p v).
  Triton's dot needs every dimension >= 16 and Triton tensors need power-of-two sizes, so the wrapper
  zero-pads the group to `group_pad = max(16, next_pow2(group))` rows (jax's bundled kernel does the
  same with `block_h`) and head_dim to `head_dim_pad = max(16, next_pow2(head_dim))` columns. The
  padded rows cost MMA work, not memory traffic, which is what decode is bound by. (The alternative,
  a broadcast multiply + sum over head_dim, needs no row padding but builds `[group, chunk,
  head_dim]` temporaries in registers; the dot keeps the tensor cores busy instead.)
- The program walks the sequence's tokens in chunks of `chunk_tokens = blocks_per_chunk *
  block_size` with an online softmax (running max `m`, running denominator `l`, f32 accumulator).
  Each chunk reads, per token position, its page id from the block table and then one
  `[chunk_tokens, head_dim_pad]` gather of K and of V from the cache viewed as `[num_slots,
  head_dim]` (slot = page * block_size + offset; head_dim columns past the real ones re-read the
  last column, harmless because q's padded columns are zero and the padded output columns are
  dropped). The loop runs `cdiv(context_len, chunk_tokens)` times, so a short sequence reads only
  its own pages.
- Masking: positions >= context_len get score -inf and their V rows are zeroed (an unused slot may
  hold NaN and 0 * NaN = NaN). Their slot is replaced by slot 0 and the block-table column is
  clamped, so a stale or short table never makes the GPU read out of bounds (interpret mode clamps
  gathers itself, so the CPU tests cannot see this guard). A padding row (context_len 0) runs no
  iterations and writes zeros.
- Scale 1/sqrt(head_dim) is applied to the f32 scores; softmax and accumulation are f32; the
  output is cast to q's dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from paged_attention.buckets import is_pow2, pow2_at_least


def default_blocks_per_chunk(block_size: int) -> int:
    """Pages per online-softmax step: enough for 64 tokens per chunk, at least one page."""
    return max(1, 64 // block_size)


def _load_kv_chunk(block_table_ref, k_ref, v_ref, positions, context_len, *, block_size: int,
                   head_dim_pad: int, dtype):
    """K and V at some token positions of one sequence, read through its block table.

    block_table_ref: i32[max_blocks] the sequence's row; k_ref, v_ref: [num_slots, head_dim] one KV
    head's cache (slot = page * block_size + offset); positions: i32[n]. Returns (k, v, valid):
    k, v [n, head_dim_pad] in `dtype` (q's: Triton's dot wants equal operand types) and
    valid = positions < context_len. V rows of invalid positions are zeros; K rows of invalid
    positions are garbage (the caller masks their scores).
    """
    max_blocks = block_table_ref.shape[0]
    head_dim = k_ref.shape[1]
    valid = positions < context_len  # bool[n]
    page = block_table_ref[jnp.minimum(positions // block_size, max_blocks - 1)]  # i32[n]
    slot = jnp.where(valid, page * block_size + positions % block_size, 0)  # never out of bounds
    column = jnp.minimum(jnp.arange(head_dim_pad), head_dim - 1)  # padded columns re-read the last
    k = k_ref[slot[:, None], column[None, :]].astype(dtype)  # gather: [n, head_dim_pad]
    v = v_ref[slot[:, None], column[None, :]].astype(dtype)
    v = jnp.where(valid[:, None], v, jnp.zeros_like(v))  # unused slots may hold NaN: 0 * NaN = NaN
    return k, v, valid


def _online_softmax_step(acc, m, l, scores, v):
    """Fold one chunk into the running flash-attention state: scores f32[rows, chunk] (-inf where
    masked), v [chunk, head_dim_pad]; (acc, m, l) = (f32[rows, head_dim_pad] unnormalized output,
    f32[rows] running max, f32[rows] running sum of exponentials)."""
    m_new = jnp.maximum(m, scores.max(axis=1))
    correction = jnp.exp(m - m_new)  # rescales what was accumulated under the old max
    p = jnp.exp(scores - m_new[:, None])  # f32[rows, chunk]; 0 where masked
    l = correction * l + p.sum(axis=1)
    acc = correction[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_new, l


def _decode_kernel(context_lens_ref,  # i32[num_seqs] (whole array)
                   block_table_ref,   # i32[max_blocks_per_seq] this sequence's row
                   q_ref,             # [group_pad, head_dim_pad] this KV head's query heads (zero-padded)
                   k_ref,             # [num_blocks * block_size, head_dim] this KV head's cache
                   v_ref,             # [num_blocks * block_size, head_dim]
                   o_ref,             # [group_pad, head_dim_pad]
                   *, block_size: int, blocks_per_chunk: int, scale: float):
    seq = pl.program_id(0)
    context_len = context_lens_ref[seq]
    group_pad, head_dim_pad = q_ref.shape
    chunk_tokens = blocks_per_chunk * block_size
    q = q_ref[...]  # [group_pad, head_dim_pad]

    def body(chunk, carry):
        acc, m, l = carry  # f32[group_pad, head_dim_pad], f32[group_pad], f32[group_pad]
        positions = chunk * chunk_tokens + jnp.arange(chunk_tokens)  # i32[chunk_tokens]
        k, v, valid = _load_kv_chunk(block_table_ref, k_ref, v_ref, positions, context_len,
                                     block_size=block_size, head_dim_pad=head_dim_pad, dtype=q.dtype)
        scores = plgpu.dot(q, k, trans_b=True) * scale  # f32[group_pad, chunk_tokens]
        return _online_softmax_step(acc, m, l, jnp.where(valid[None, :], scores, -jnp.inf), v)

    init = (jnp.zeros((group_pad, head_dim_pad), jnp.float32),
            jnp.full((group_pad,), jnp.finfo(jnp.float32).min, jnp.float32),  # finite: no inf - inf
            jnp.zeros((group_pad,), jnp.float32))
    acc, _, l = lax.fori_loop(0, pl.cdiv(context_len, chunk_tokens), body, init)
    safe_l = jnp.where(l > 0, l, 1.0)
    out = jnp.where(l[:, None] > 0, acc / safe_l[:, None], 0.0)  # padding row (no keys): zeros
    o_ref[...] = out.astype(o_ref.dtype)


def _check_cache(q, k_cache, v_cache):
    """Checks of the paged K/V arrays against q [tokens or seqs, num_heads, head_dim]."""
    if q.ndim != 3:
        raise ValueError(f"q must be 3-D [..., num_heads, head_dim], got shape {q.shape}")
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be [num_kv_heads, num_blocks, block_size, head_dim], "
                         f"got shape {k_cache.shape}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {v_cache.shape} differs from k_cache shape {k_cache.shape}")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache dtype {v_cache.dtype} differs from k_cache dtype {k_cache.dtype}")
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} differs from q head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"q num_heads {num_heads} is not a multiple of k_cache num_kv_heads {num_kv_heads}")


def _check_tables(block_tables, context_lens, num_seqs: int):
    """Checks of the per-sequence metadata."""
    if block_tables.ndim != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [num_seqs={num_seqs}, max_blocks_per_seq], "
                         f"got shape {block_tables.shape}")
    if block_tables.dtype != jnp.int32:
        raise ValueError(f"block_tables must be int32, got {block_tables.dtype}")
    if context_lens.shape != (num_seqs,):
        raise ValueError(f"context_lens must be [num_seqs={num_seqs}], got shape {context_lens.shape}")
    if context_lens.dtype != jnp.int32:
        raise ValueError(f"context_lens must be int32, got {context_lens.dtype}")


def _check_kernel_shapes(block_size: int, blocks_per_chunk: int):
    """What the Triton lowering needs: power-of-two tensor sizes, dot dimensions >= 16."""
    if not is_pow2(block_size):
        raise ValueError(f"k_cache block_size must be a power of two, got {block_size}")
    if not is_pow2(blocks_per_chunk) or blocks_per_chunk * block_size < 16:
        raise ValueError(f"blocks_per_chunk must be a power of two with blocks_per_chunk * block_size >= 16, "
                         f"got {blocks_per_chunk} (block_size {block_size})")


def _padded_head_dim(head_dim: int) -> int:
    """Triton tiles need power-of-two sizes and dots need K >= 16: the head_dim the kernels work in."""
    return max(16, pow2_at_least(head_dim))


def _check_inputs(q, k_cache, v_cache, block_tables, context_lens):
    """Shape/dtype checks shared by the decode kernel wrapper and its reference."""
    _check_cache(q, k_cache, v_cache)
    _check_tables(block_tables, context_lens, q.shape[0])


@functools.partial(jax.jit, static_argnames=("interpret", "blocks_per_chunk", "num_warps", "num_stages"))
def paged_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, block_tables: jax.Array,
                           context_lens: jax.Array, *, interpret: bool = False,
                           blocks_per_chunk: int | None = None,
                           num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """Attention of one query token per sequence over its paged KV cache (Pallas kernel).

    q: [num_seqs, num_heads, head_dim]; k_cache, v_cache: [num_kv_heads, num_blocks, block_size,
    head_dim]; block_tables: i32[num_seqs, max_blocks_per_seq]; context_lens: i32[num_seqs], the
    cached tokens of each sequence including the current one (0: padding row, output zeros).
    Returns [num_seqs, num_heads, head_dim] in q's dtype.

    blocks_per_chunk: pages per online-softmax step (power of two; blocks_per_chunk * block_size
    must be >= 16 for Triton's dot). block_size must be a power of two; any head_dim works (padded
    to a power of two >= 16 inside). Every context_len must be <= max_blocks_per_seq * block_size
    (not checked on device).
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, num_blocks, block_size, _ = k_cache.shape
    if blocks_per_chunk is None:
        blocks_per_chunk = default_blocks_per_chunk(block_size)
    _check_kernel_shapes(block_size, blocks_per_chunk)
    group = num_heads // num_kv_heads
    group_pad, head_dim_pad = max(16, pow2_at_least(group)), _padded_head_dim(head_dim)
    max_blocks = block_tables.shape[1]
    num_slots = num_blocks * block_size

    # [num_seqs, kv_heads, group_pad, head_dim_pad]: the q heads of one KV head are rows of one tile.
    q_grouped = q.reshape(num_seqs, num_kv_heads, group, head_dim)
    q_grouped = jnp.pad(q_grouped, ((0, 0), (0, 0), (0, group_pad - group), (0, head_dim_pad - head_dim)))
    # The cache viewed as [kv_heads, num_slots, head_dim] (a free reshape): the kernel gathers slots.
    k_slots = k_cache.reshape(num_kv_heads, num_slots, head_dim)
    v_slots = v_cache.reshape(num_kv_heads, num_slots, head_dim)

    kernel = functools.partial(_decode_kernel, block_size=block_size, blocks_per_chunk=blocks_per_chunk,
                               scale=1.0 / math.sqrt(head_dim))
    out = pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads),
        in_specs=[
            pl.BlockSpec((num_seqs,), lambda s, h: (0,)),  # context_lens, whole
            pl.BlockSpec((None, max_blocks), lambda s, h: (s, 0)),  # block_tables row
            pl.BlockSpec((None, None, group_pad, head_dim_pad), lambda s, h: (s, h, 0, 0)),  # q group
            pl.BlockSpec((None, num_slots, head_dim), lambda s, h: (h, 0, 0)),  # k slots of head h
            pl.BlockSpec((None, num_slots, head_dim), lambda s, h: (h, 0, 0)),  # v slots of head h
        ],
        out_specs=pl.BlockSpec((None, None, group_pad, head_dim_pad), lambda s, h: (s, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(q_grouped.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(context_lens, block_tables, q_grouped, k_slots, v_slots)
    return out[:, :, :group, :head_dim].reshape(num_seqs, num_heads, head_dim)


@functools.partial(jax.jit, static_argnames=("interpret", "blocks_per_chunk", "num_warps", "num_stages"))
def paged_decode_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                                     block_tables: jax.Array, context_lens: jax.Array, *,
                                     interpret: bool = False, blocks_per_chunk: int | None = None,
                                     num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """Pure-jnp paged decode attention, same signature (the tuning arguments are ignored).

    Gathers each sequence's pages into a dense `[kv_heads, max_blocks * block_size, head_dim]` K/V,
    masks positions >= context_len (in the scores *and* in V, since unused slots may hold NaN), and
    takes a plain f32 softmax. A row with context_len 0 returns zeros.
    """
    del interpret, blocks_per_chunk, num_warps, num_stages
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, num_blocks, block_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_tokens = block_tables.shape[1] * block_size
    table = jnp.clip(block_tables, 0, num_blocks - 1)
    # k_cache[:, table] is [kv_heads, num_seqs, max_blocks, block_size, head_dim]
    k = k_cache[:, table].reshape(num_kv_heads, num_seqs, max_tokens, head_dim).swapaxes(0, 1)
    v = v_cache[:, table].reshape(num_kv_heads, num_seqs, max_tokens, head_dim).swapaxes(0, 1)
    valid = jnp.arange(max_tokens)[None, :] < context_lens[:, None]  # bool[num_seqs, max_tokens]
    v = jnp.where(valid[:, None, :, None], v, 0)
    qg = q.reshape(num_seqs, num_kv_heads, group, head_dim)
    scores = jnp.einsum("skgd,sktd->skgt", qg, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(valid[:, None, None, :], probs, 0.0)  # all-masked row: NaN -> 0
    out = jnp.einsum("skgt,sktd->skgd", probs, v.astype(jnp.float32))
    return out.reshape(num_seqs, num_heads, head_dim).astype(q.dtype)
