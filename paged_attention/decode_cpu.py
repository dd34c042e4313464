"""Paged decode attention written for XLA on CPU: exact, and much faster there than the dense
`paged_decode_attention_reference` at ShareGPT-like lengths, because it never pads a sequence to the
longest one (`python -m experiments.decode_step --backend ...` times whole decode steps with
either).

Usage (host side once per model step, for all layers):
    pairs = build_decode_indices(block_tables, context_lens, num_blocks, num_kv_heads, block_size)
    out = paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, *pairs)

- Every page of a sequence but its *last* is full, so it needs no mask. Those pages form a flat,
  host-built list of (sequence, block) pairs, padded to a bucketed length, processed in a
  `fori_loop` over chunks of CHUNK pairs: gather the K/V rows and the query of each pair's sequence,
  and compute the per-page partial softmax (max, sum, unnormalized output). Padding pairs read
  block 0 and belong to a dummy sequence whose partials are dropped, so NaN in block 0 cannot leak.
- Each sequence's last page (one per sequence, found on device from block_tables/context_lens) is
  done once with the position mask on the scores and a `where` on the values (unused slots may hold
  NaN); a row with context_len 0 is all masked and returns zeros.
- Partials merge per sequence with segment_max / segment_sum (the flash-decoding reduction).
- A step whose block tables hold few pages in all (batch-1 decode, a few short sequences: at most
  DENSE_MAX_PAGES, padding included) skips the loop: one gather of every page in the tables and one
  masked softmax, since the loop's fixed costs (a chunk of CHUNK pairs, mostly padding) dominate there.
- An int8 cache's keys and values are gathered in one fusion and then converted to f32 one by one;
  gathered apart, XLA fuses the values' convert into the probs . values multiply-reduce, which then
  converts each value once per query head of its group (an FP8 cache, whose convert is a software
  routine on CPU, measured slower the stacked way and keeps the two gathers).
- The chunked loop keeps every temporary small (XLA CPU allocates each execution's temporaries
  anew, and big fresh allocations page-fault); probs . values is a multiply-reduce because a
  batched dot contracting the probs' non-minor dimension takes a slow XLA CPU path.
Pairs are bucketed to 2 sizes per octave ({4, 6} x 2^k chunks) to bound compilations.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from paged_attention.buckets import two_per_octave

CHUNK = 64  # (sequence, block) pairs per loop iteration
DENSE_MAX_PAGES = 64  # tables (num_seqs x max_blocks, padded) this small take the one-gather path

_PROMISE = lax.GatherScatterMode.PROMISE_IN_BOUNDS
_ROWS_DN = lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,))


# ----------------------------------------------------------------------------------------- host side


def build_decode_indices(block_tables, context_lens, num_blocks: int, num_kv_heads: int,
                         block_size: int = 16, chunk: int = CHUNK, min_chunks: int = 1):
    """Host-side (numpy) index arrays for paged_decode_attention_cpu.

    block_tables i32[num_seqs, max_blocks], context_lens i32[num_seqs]. The pairs are (seq, page)
    for page < (context_lens[seq] - 1) // block_size, i.e. all pages of each sequence but its last,
    in sequence order. Returns
      pair_seq   i32[num_pairs]: each pair's sequence (padding: num_seqs, a dummy);
      pair_query i32[num_pairs // chunk, chunk]: the same, one row per loop chunk;
      pair_rows  i32[num_pairs // chunk, num_kv_heads * chunk]: the flat cache rows
                 kv * num_blocks + block_tables[seq, page] (kv-major inside a chunk; padding: block 0).
    num_pairs = chunk x a bucketed chunk count (at least `min_chunks`, itself a bucket size: a caller
    padding to a larger compiled shape asks for its length), so only a few distinct shapes occur.
    """
    tables = np.asarray(block_tables)
    context = np.asarray(context_lens).astype(np.int64)
    num_seqs = tables.shape[0]
    num_full_pages = np.maximum((context - 1) // block_size, 0)  # i64[num_seqs]: all pages but the last
    num_real_pairs = int(num_full_pages.sum())
    num_chunks = two_per_octave(-(-num_real_pairs // chunk), min_chunks)
    num_pairs = num_chunks * chunk
    real_seq = np.repeat(np.arange(num_seqs), num_full_pages)  # i64[num_real_pairs]
    real_page = np.arange(num_real_pairs) - np.repeat(np.cumsum(num_full_pages) - num_full_pages, num_full_pages)
    pair_seq = np.full(num_pairs, num_seqs, np.int32)
    pair_seq[:num_real_pairs] = real_seq
    pair_block = np.zeros(num_pairs, np.int32)
    pair_block[:num_real_pairs] = tables[real_seq, real_page]
    pair_rows = (np.arange(num_kv_heads, dtype=np.int32)[None, :, None] * num_blocks
                 + pair_block.reshape(num_chunks, 1, chunk)).reshape(num_chunks, num_kv_heads * chunk).astype(np.int32)
    return pair_seq, pair_seq.reshape(num_chunks, chunk).copy(), pair_rows


# --------------------------------------------------------------------------------------- device side
def gather_rows(flat, idx):
    """flat [num_rows, width], idx i32[n] (in bounds) -> [n, width]: one row gather."""
    return lax.gather(flat, idx[:, None], _ROWS_DN, slice_sizes=(1, flat.shape[1]), mode=_PROMISE)


def gather_keys_values(kflat, vflat, rows, shape):
    """The cache rows `rows` (i32[n], in bounds) of kflat and vflat [num_rows, width], each reshaped
    to `shape` and converted to f32: keys, values f32[*shape]. An int8 cache's two gathers are
    stacked so that each convert happens once, outside the multiply-reduce that reads the values."""
    if kflat.dtype == jnp.int8:
        both = jnp.stack([gather_rows(kflat, rows), gather_rows(vflat, rows)]).astype(jnp.float32)
        return both[0].reshape(shape), both[1].reshape(shape)
    return (gather_rows(kflat, rows).reshape(shape).astype(jnp.float32),
            gather_rows(vflat, rows).reshape(shape).astype(jnp.float32))


def _block_partials(scaled_q, keys, values, valid):
    """Partial softmax over one page for each of n (query, page) items.

    scaled_q f32[num_kv_heads, n, group, head_dim] (q pre-scaled by 1 / sqrt(head_dim)),
    keys/values f32[num_kv_heads, n, block_size, head_dim], valid None or bool[n, block_size].
    Returns block_max f32[num_kv_heads, n, group] (finite), block_sum f32[num_kv_heads, n, group],
    block_out f32[num_kv_heads, n, group, head_dim] (unnormalized, relative to block_max)."""
    # f32[num_kv_heads, n, block_size, group]
    scores = lax.dot_general(keys, scaled_q, (((3,), (3,)), ((0, 1), (0, 1))))
    if valid is not None:
        scores = jnp.where(valid[None, :, :, None], scores, -jnp.inf)
    block_max = scores.max(2)
    if valid is not None:
        block_max = jnp.where(jnp.isfinite(block_max), block_max, 0.0)  # fully masked block (padding row)
    probs = jnp.exp(scores - block_max[:, :, None, :])  # 0 where masked
    block_sum = probs.sum(2)
    if valid is not None:
        values = jnp.where(valid[None, :, :, None], values, 0.0)  # unused slots may hold NaN
    # probs . values as a multiply-reduce: a batched dot contracting probs' non-minor dim hits a slow XLA CPU path
    block_out = (probs[..., None] * values[:, :, :, None, :]).sum(2)  # f32[num_kv_heads, n, group, head_dim]
    return block_max, block_sum, block_out


def _page_partials(scaled_q, kflat, vflat, blocks, valid, num_blocks: int):
    """Partial softmax of each sequence over the given pages of it, read as one span of keys.

    scaled_q f32[num_seqs, num_kv_heads, group, head_dim]; kflat / vflat the cache as rows
    [num_kv_heads * num_blocks, block_size * head_dim]; blocks i32[num_seqs, pages] (in range);
    valid bool[num_seqs, pages * block_size]. Returns `_block_partials`' (max, sum, out), kv-major."""
    num_seqs, num_kv_heads, _, head_dim = scaled_q.shape
    rows = ((jnp.arange(num_kv_heads, dtype=jnp.int32) * num_blocks)[:, None] + blocks.reshape(1, -1)).reshape(-1)
    shape = (num_kv_heads, num_seqs, valid.shape[1], head_dim)
    keys, values = gather_keys_values(kflat, vflat, rows, shape)  # f32[*shape] each
    return _block_partials(scaled_q.transpose(1, 0, 2, 3), keys, values, valid)


def _normalized(out, total):
    """out / total (unnormalized output [..., head_dim] and its softmax sum [...]); zeros where the
    sum is 0 (a padding row, every position masked)."""
    return jnp.where(total[..., None] > 0, out / jnp.where(total > 0, total, 1.0)[..., None], 0.0)


@functools.partial(jax.jit, static_argnames=("dense_max_pages",))
def paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, pair_seq, pair_query, pair_rows,
                               *, dense_max_pages: int = DENSE_MAX_PAGES):
    """q f32[num_seqs, num_heads, head_dim]; k_cache/v_cache [num_kv_heads, num_blocks, block_size, head_dim];
    block_tables i32[num_seqs, max_blocks]; context_lens i32[num_seqs] (0: padding row -> zeros);
    pair_seq, pair_query, pair_rows: from build_decode_indices (unread when the tables hold at most
    `dense_max_pages` pages: one gather of them all). Returns [num_seqs, num_heads, head_dim] in q's dtype."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, num_blocks, block_size, _ = k_cache.shape
    group = num_heads // num_kv_heads  # query heads per kv head
    num_chunks, chunk = pair_query.shape
    num_pairs = num_chunks * chunk
    scaled_q = (q.astype(jnp.float32) * (1.0 / math.sqrt(head_dim))).reshape(num_seqs, num_kv_heads, group, head_dim)
    kflat = k_cache.reshape(num_kv_heads * num_blocks, block_size * head_dim)
    vflat = v_cache.reshape(num_kv_heads * num_blocks, block_size * head_dim)
    if block_tables.size <= dense_max_pages:  # few pages: all of them in one gather, masked past each context
        tables = jnp.clip(block_tables, 0, num_blocks - 1)
        valid = jnp.arange(tables.shape[1] * block_size)[None, :] < context_lens[:, None]
        _, total, out = _page_partials(scaled_q, kflat, vflat, tables, valid, num_blocks)
        return _normalized(out, total).transpose(1, 0, 2, 3).reshape(num_seqs, num_heads, head_dim).astype(q.dtype)
    # f32[num_seqs + 1, num_kv_heads, group, head_dim]: sequence num_seqs is the padding pairs' dummy
    q_padded = jnp.concatenate([scaled_q, jnp.zeros((1, num_kv_heads, group, head_dim), scaled_q.dtype)], 0)
    q_flat = q_padded.reshape(num_seqs + 1, num_kv_heads * group * head_dim)

    # 1) all pages but each sequence's last: full, unmasked; chunked so temporaries stay in L2.
    def body(i, carry):
        pair_max, pair_sum, pair_out = carry
        rows = pair_rows[i]
        chunk_q = gather_rows(q_flat, pair_query[i]).reshape(chunk, num_kv_heads, group, head_dim)
        chunk_q = chunk_q.transpose(1, 0, 2, 3)  # f32[num_kv_heads, chunk, group, head_dim]
        keys, values = gather_keys_values(kflat, vflat, rows, (num_kv_heads, chunk, block_size, head_dim))
        block_max, block_sum, block_out = _block_partials(chunk_q, keys, values, None)
        return (lax.dynamic_update_slice(pair_max, block_max, (0, i * chunk, 0)),
                lax.dynamic_update_slice(pair_sum, block_sum, (0, i * chunk, 0)),
                lax.dynamic_update_slice(pair_out, block_out, (0, i * chunk, 0, 0)))

    init = (jnp.zeros((num_kv_heads, num_pairs, group), jnp.float32),  # pair_max
            jnp.zeros((num_kv_heads, num_pairs, group), jnp.float32),  # pair_sum
            jnp.zeros((num_kv_heads, num_pairs, group, head_dim), jnp.float32))  # pair_out
    pair_max, pair_sum, pair_out = lax.fori_loop(0, num_chunks, body, init)

    # 2) each sequence's last page, masked (num_seqs of them).
    last_page = jnp.maximum(context_lens - 1, 0) // block_size  # i32[num_seqs]
    last_page = jnp.minimum(last_page, block_tables.shape[1] - 1)
    last_block = jnp.clip(jnp.take_along_axis(block_tables, last_page[:, None], axis=1)[:, 0], 0, num_blocks - 1)
    # bool[num_seqs, block_size]: all False for context_len 0
    valid = jnp.arange(block_size)[None, :] < (context_lens - last_page * block_size)[:, None]
    # last_max/last_sum f32[num_kv_heads, num_seqs, group], last_out f32[num_kv_heads, num_seqs, group, head_dim]
    last_max, last_sum, last_out = _page_partials(scaled_q, kflat, vflat, last_block[:, None], valid, num_blocks)

    # 3) merge partials per sequence (segment num_seqs is the padding dummy, dropped).
    segments = dict(num_segments=num_seqs + 1, indices_are_sorted=True)
    seq_max = jax.ops.segment_max(pair_max.transpose(1, 0, 2), pair_seq, **segments)[:num_seqs]
    seq_max = jnp.maximum(seq_max, last_max.transpose(1, 0, 2))  # f32[num_seqs, num_kv_heads, group], finite
    pair_seq_max = jnp.take(jnp.concatenate([seq_max, jnp.zeros((1, num_kv_heads, group), seq_max.dtype)]),
                            pair_seq, axis=0)  # f32[num_pairs, num_kv_heads, group]
    pair_weight = jnp.exp(pair_max.transpose(1, 0, 2) - pair_seq_max)  # f32[num_pairs, num_kv_heads, group]
    seq_sum = jax.ops.segment_sum(pair_sum.transpose(1, 0, 2) * pair_weight, pair_seq, **segments)[:num_seqs]
    seq_out = jax.ops.segment_sum(pair_out.transpose(1, 0, 2, 3) * pair_weight[..., None], pair_seq,
                                  **segments)[:num_seqs]  # f32[num_seqs, num_kv_heads, group, head_dim]
    last_weight = jnp.exp(last_max.transpose(1, 0, 2) - seq_max)  # f32[num_seqs, num_kv_heads, group]
    seq_sum = seq_sum + last_sum.transpose(1, 0, 2) * last_weight
    seq_out = seq_out + last_out.transpose(1, 0, 2, 3) * last_weight[..., None]
    return _normalized(seq_out, seq_sum).reshape(num_seqs, num_heads, head_dim).astype(q.dtype)
