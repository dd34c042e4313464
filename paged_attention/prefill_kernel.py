"""Ragged (chunked) prefill attention over the paged KV cache.

A step's query tokens from all sequences are flattened into one `q[num_tokens, num_heads, head_dim]`
(possibly padded at the end); sequence s owns `q[query_start_loc[s]:query_start_loc[s + 1]]`. The
chunk's K/V has already been written into the cache, so everything is read from pages:
`context_lens[s]` is the sequence's cached length *after* this chunk, its `q_len` queries sit at
positions `context_lens[s] - q_len + i`, and query i attends to every cached key at a position <= its
own (the earlier context, from an earlier chunk or a shared prefix, plus causal attention within the
chunk). A decode token is the case q_len = 1, so one call serves a mixed prefill + decode batch.
Tokens at index >= query_start_loc[num_seqs] are padding and come back as zeros.

Kernel design (written for GPU, i.e. Triton-lowered Pallas; tested in interpret mode on CPU):
- GQA: the wrapper regroups q to `[num_kv_heads, num_tokens * group_pad, head_dim_pad]`, row
  `t * group_pad + g` holding query head g of the KV head's group for token t (`group_pad` = the
  group size rounded up to a power of two; head_dim zero-padded to a power of two >= 16, as in the
  decode kernel). A tile of `block_q` consecutive tokens is then one contiguous
  `[block_q * group_pad, head_dim_pad]` slab, the M side of the dots; each K/V page is read once
  for the whole group.
- grid `(num_q_tiles, num_seqs, num_kv_heads)` with `num_q_tiles = cdiv(max_query_len, block_q)`
  (static; `max_query_len` defaults to num_tokens, always safe). A program whose tile starts past its
  sequence's q_len returns at once. Tiles start at data-dependent rows (query_start_loc), so q is
  loaded and the output stored with masked `plgpu.load` / `plgpu.store` over `pl.ds(row0, rows)`:
  rows past the sequence's end belong to the next sequence and are never written. (On a GPU the
  programs run in any order; the tile axis is outermost so that interpret mode, which runs them in
  order, also runs a sequence's overhanging tile *after* the next sequence's first tile and a
  missing store mask shows up in the CPU tests.)
- Flash-style online softmax over chunks of `blocks_per_chunk * block_size` token positions (the
  same gather through the block table as the decode kernel, `decode_kernel._load_kv_chunk`), up to
  the chunk holding the tile's last query position: the causal structure is used to skip the keys
  no query of the tile can see.
- Masking: a key is visible to a row iff key_pos <= query_pos (query_pos < context_len, so the
  unused tail of the last page is masked too); V rows at positions >= context_len are zeroed (NaN
  garbage: 0 * NaN = NaN); positions past the sequence read slot 0 instead of a stale table entry.
  Rows past q_len get query_pos -1, see nothing, and are not stored. The masked q load and the slot
  clamp only keep the GPU from reading out of bounds: interpret mode pads and clamps such reads
  itself, so the CPU tests cannot see them.
- Scale 1/sqrt(head_dim) on the f32 scores; softmax and accumulation in f32; output in q's dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from paged_attention import contiguous
from paged_attention.buckets import is_pow2, pow2_at_least
from paged_attention.decode_kernel import (_check_cache, _check_kernel_shapes, _check_tables,
                                           _load_kv_chunk, _online_softmax_step, _padded_head_dim,
                                           default_blocks_per_chunk)


def _prefill_kernel(query_start_loc_ref,  # i32[num_seqs + 1] (whole array)
                    context_lens_ref,     # i32[num_seqs] (whole array)
                    block_table_ref,      # i32[max_blocks_per_seq] this sequence's row
                    q_ref,                # [num_tokens * group_pad, head_dim_pad] this KV head's query rows
                    k_ref,                # [num_blocks * block_size, head_dim] this KV head's cache
                    v_ref,                # [num_blocks * block_size, head_dim]
                    o_ref,                # [num_tokens * group_pad, head_dim_pad]
                    *, block_q: int, group_pad: int, block_size: int, blocks_per_chunk: int, scale: float):
    tile, seq = pl.program_id(0), pl.program_id(1)
    q_start = query_start_loc_ref[seq]
    q_len = query_start_loc_ref[seq + 1] - q_start
    context_len = context_lens_ref[seq]
    first_query_pos = context_len - q_len  # position of the sequence's first query token
    tile_start = tile * block_q  # index of the tile's first query within the sequence
    head_dim_pad = q_ref.shape[1]
    chunk_tokens = blocks_per_chunk * block_size
    rows = block_q * group_pad

    @pl.when(tile_start < q_len)
    def _():
        query = tile_start + jnp.arange(rows) // group_pad  # i32[rows]: query index within the seq
        row_valid = query < q_len
        query_pos = jnp.where(row_valid, first_query_pos + query, -1)  # -1: sees no key
        row0 = (q_start + tile_start) * group_pad
        row_mask = jnp.broadcast_to(row_valid[:, None], (rows, head_dim_pad))
        q = plgpu.load(q_ref.at[pl.ds(row0, rows), :], mask=row_mask, other=0.0)  # [rows, head_dim_pad]
        tile_last_pos = first_query_pos + jnp.minimum(tile_start + block_q, q_len) - 1

        def body(chunk, carry):
            acc, m, l = carry  # f32[rows, head_dim_pad], f32[rows], f32[rows]
            key_pos = chunk * chunk_tokens + jnp.arange(chunk_tokens)  # i32[chunk_tokens]
            k, v, _ = _load_kv_chunk(block_table_ref, k_ref, v_ref, key_pos, context_len,
                                     block_size=block_size, head_dim_pad=head_dim_pad, dtype=q.dtype)
            visible = key_pos[None, :] <= query_pos[:, None]  # bool[rows, chunk_tokens]
            scores = plgpu.dot(q, k, trans_b=True) * scale  # f32[rows, chunk_tokens]
            return _online_softmax_step(acc, m, l, jnp.where(visible, scores, -jnp.inf), v)

        init = (jnp.zeros((rows, head_dim_pad), jnp.float32),
                jnp.full((rows,), jnp.finfo(jnp.float32).min, jnp.float32),  # finite: no inf - inf
                jnp.zeros((rows,), jnp.float32))
        num_chunks = pl.cdiv(tile_last_pos + 1, chunk_tokens)  # keys past the tile's last query: skipped
        acc, _, l = lax.fori_loop(0, num_chunks, body, init)
        # Every stored row sees key position 0, so l > 0 there; rows past q_len (l = 0) are not stored.
        out = acc / l[:, None]
        plgpu.store(o_ref.at[pl.ds(row0, rows), :], out.astype(o_ref.dtype), mask=row_mask)


def _check_inputs(q, k_cache, v_cache, block_tables, context_lens, query_start_loc):
    """Shape/dtype checks shared by the kernel wrapper and the reference."""
    _check_cache(q, k_cache, v_cache)
    if query_start_loc.ndim != 1 or query_start_loc.shape[0] < 1:
        raise ValueError(f"query_start_loc must be [num_seqs + 1], got shape {query_start_loc.shape}")
    if query_start_loc.dtype != jnp.int32:
        raise ValueError(f"query_start_loc must be int32, got {query_start_loc.dtype}")
    _check_tables(block_tables, context_lens, query_start_loc.shape[0] - 1)


_STATIC = ("interpret", "max_query_len", "block_q", "blocks_per_chunk", "num_warps", "num_stages")


@functools.partial(jax.jit, static_argnames=_STATIC)
def paged_prefill_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, block_tables: jax.Array,
                            context_lens: jax.Array, query_start_loc: jax.Array, *, interpret: bool = False,
                            max_query_len: int | None = None, block_q: int | None = None,
                            blocks_per_chunk: int | None = None, num_warps: int = 4,
                            num_stages: int = 2) -> jax.Array:
    """Causal attention of a ragged batch of query chunks over the paged KV cache (Pallas kernel).

    q: [num_tokens, num_heads, head_dim]; k_cache, v_cache: [num_kv_heads, num_blocks, block_size,
    head_dim]; block_tables: i32[num_seqs, max_blocks_per_seq]; context_lens: i32[num_seqs] (cached
    tokens after this chunk's K/V was written, >= the sequence's q_len); query_start_loc:
    i32[num_seqs + 1], non-decreasing.
    Returns [num_tokens, num_heads, head_dim] in q's dtype, zeros for padding tokens.

    max_query_len: static upper bound on any sequence's q_len (default num_tokens); a smaller bound
    means a smaller grid, but queries past it are not computed (not checked on device).
    block_q: query tokens per tile (power of two; block_q * group_pad >= 16); default 64 rows.
    blocks_per_chunk: pages per online-softmax step (as in `paged_decode_attention`); block_size
    must be a power of two, any head_dim works (padded to a power of two >= 16 inside).
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, query_start_loc)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_blocks, block_size, _ = k_cache.shape
    num_seqs = block_tables.shape[0]
    if blocks_per_chunk is None:
        blocks_per_chunk = default_blocks_per_chunk(block_size)
    _check_kernel_shapes(block_size, blocks_per_chunk)
    group = num_heads // num_kv_heads
    group_pad, head_dim_pad = pow2_at_least(group), _padded_head_dim(head_dim)
    if block_q is None:
        block_q = max(1, 64 // group_pad)
    if not is_pow2(block_q) or block_q * group_pad < 16:
        raise ValueError(f"block_q must be a power of two with block_q * group_pad >= 16, got {block_q} "
                         f"(group_pad {group_pad})")
    if max_query_len is None:
        max_query_len = num_tokens
    if max_query_len < 1:
        raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
    num_q_tiles = pl.cdiv(max_query_len, block_q)

    # [kv_heads, num_tokens * group_pad, head_dim_pad]: row t * group_pad + g is q head g of the
    # group, token t.
    q_rows = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, group_pad - group), (0, head_dim_pad - head_dim)))
    total_rows = num_tokens * group_pad
    q_rows = q_rows.transpose(1, 0, 2, 3).reshape(num_kv_heads, total_rows, head_dim_pad)
    # The cache viewed as [kv_heads, num_slots, head_dim] (a free reshape): the kernel gathers slots.
    num_slots = num_blocks * block_size
    k_slots = k_cache.reshape(num_kv_heads, num_slots, head_dim)
    v_slots = v_cache.reshape(num_kv_heads, num_slots, head_dim)
    max_blocks = block_tables.shape[1]

    kernel = functools.partial(_prefill_kernel, block_q=block_q, group_pad=group_pad, block_size=block_size,
                               blocks_per_chunk=blocks_per_chunk, scale=1.0 / math.sqrt(head_dim))
    out = pl.pallas_call(
        kernel,
        grid=(num_q_tiles, num_seqs, num_kv_heads),
        in_specs=[
            pl.BlockSpec((num_seqs + 1,), lambda t, s, h: (0,)),  # query_start_loc, whole
            pl.BlockSpec((num_seqs,), lambda t, s, h: (0,)),  # context_lens, whole
            pl.BlockSpec((None, max_blocks), lambda t, s, h: (s, 0)),  # block_tables row
            pl.BlockSpec((None, total_rows, head_dim_pad), lambda t, s, h: (h, 0, 0)),  # q rows of KV head h
            pl.BlockSpec((None, num_slots, head_dim), lambda t, s, h: (h, 0, 0)),  # k slots of head h
            pl.BlockSpec((None, num_slots, head_dim), lambda t, s, h: (h, 0, 0)),  # v slots of head h
        ],
        out_specs=pl.BlockSpec((None, total_rows, head_dim_pad), lambda t, s, h: (h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((num_kv_heads, total_rows, head_dim_pad), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_prefill_attention",
    )(query_start_loc, context_lens, block_tables, q_rows, k_slots, v_slots)
    out = out.reshape(num_kv_heads, num_tokens, group_pad, head_dim_pad)[:, :, :group, :head_dim]
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, num_heads, head_dim)
    # Padding tokens (and, on a GPU, their never-written output rows) become zeros.
    is_query = jnp.arange(num_tokens) < query_start_loc[-1]
    return jnp.where(is_query[:, None, None], out, jnp.zeros_like(out))


@functools.partial(jax.jit, static_argnames=_STATIC)
def paged_prefill_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                                      block_tables: jax.Array, context_lens: jax.Array,
                                      query_start_loc: jax.Array, *, interpret: bool = False,
                                      max_query_len: int | None = None, block_q: int | None = None,
                                      blocks_per_chunk: int | None = None, num_warps: int = 4,
                                      num_stages: int = 2) -> jax.Array:
    """Pure-jnp ragged paged prefill attention, same signature (tuning arguments ignored).

    Finds each token's sequence and position, gathers each sequence's pages into a dense
    `[max_blocks * block_size]` K/V, masks keys after the query's position (in the scores) and
    positions >= context_len (in V too: unused slots may hold NaN), and takes a plain f32 softmax.
    With `max_query_len` (static), queries are first padded per sequence to `[num_seqs,
    max_query_len]` so attention is one batched GEMM per sequence; without it, every token gets its
    own copy of its sequence's keys (simplest, but memory grows as tokens x context).
    """
    del interpret, block_q, blocks_per_chunk, num_warps, num_stages
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, query_start_loc)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_blocks, block_size, _ = k_cache.shape
    num_seqs = block_tables.shape[0]
    group = num_heads // num_kv_heads
    max_keys = block_tables.shape[1] * block_size

    token = jnp.arange(num_tokens)
    is_query = token < query_start_loc[-1]
    seq = jnp.clip(jnp.searchsorted(query_start_loc, token, side="right") - 1, 0, num_seqs - 1)  # i32[tokens]
    q_len = query_start_loc[seq + 1] - query_start_loc[seq]
    query_pos = context_lens[seq] - q_len + (token - query_start_loc[seq])
    query_pos = jnp.where(is_query, query_pos, -1)  # padding sees nothing

    table = jnp.clip(block_tables, 0, num_blocks - 1)
    # k_cache[:, table] is [kv_heads, num_seqs, max_blocks, block_size, head_dim]
    k = k_cache[:, table].reshape(num_kv_heads, num_seqs, max_keys, head_dim).swapaxes(0, 1)
    v = v_cache[:, table].reshape(num_kv_heads, num_seqs, max_keys, head_dim).swapaxes(0, 1)
    if k_cache.dtype.itemsize == 1:  # an FP8 / int8 cache, widened once gathered (8-bit types never promote)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    key_pos = jnp.arange(max_keys)
    v = jnp.where((key_pos[None, :] < context_lens[:, None])[:, None, :, None], v, 0)
    if max_query_len is not None:
        return _attend_padded_by_sequence(q, k, v, seq, token - query_start_loc[seq], query_pos, is_query,
                                          max_query_len)
    k, v = k[seq], v[seq]  # [tokens, kv_heads, max_keys, head_dim]
    visible = key_pos[None, :] <= query_pos[:, None]  # bool[tokens, max_keys]

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    scores = jnp.einsum("tkgd,tksd->tkgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(visible[:, None, None, :], probs, 0.0)  # a token that sees nothing: NaN -> 0
    out = jnp.einsum("tkgs,tksd->tkgd", probs, v.astype(jnp.float32))
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def _attend_padded_by_sequence(q, k, v, seq, offset, query_pos, is_query, max_query_len: int):
    """Scatter each token to row `offset` of its sequence's `[max_query_len]` query block, attend
    per sequence (causal by position, GQA), gather back. k, v: [num_seqs, kv_heads, max_keys,
    head_dim] with V already masked; tokens past max_query_len in their sequence are not computed."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, max_keys = k.shape[0], k.shape[2]
    row = jnp.where(is_query & (offset < max_query_len), offset, max_query_len)  # out of range: dropped
    q_pad = jnp.zeros((num_seqs, max_query_len, num_heads, head_dim), q.dtype).at[seq, row].set(q, mode="drop")
    pos_pad = jnp.full((num_seqs, max_query_len), -1, jnp.int32).at[seq, row].set(query_pos, mode="drop")
    key_pos = jnp.arange(max_keys, dtype=jnp.int32)[None, :]
    out = contiguous.causal_attention(q_pad, k, v.astype(k.dtype), pos_pad, key_pos)  # [seqs, max_q, H, D]
    out = out[seq, jnp.minimum(row, max_query_len - 1)]  # [tokens, num_heads, head_dim]
    return jnp.where((row < max_query_len)[:, None, None], out, 0).astype(q.dtype)
