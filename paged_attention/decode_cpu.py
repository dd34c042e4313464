"""Paged decode attention written for XLA on CPU: exact, and much faster there than the dense
`paged_decode_attention_reference` at ShareGPT-like lengths, because it never pads a sequence to the
longest one (`python -m experiments.decode_step --backend ...` times whole decode steps with
either).

Usage (host side once per model step, for all layers):
    pairs = build_decode_indices(block_tables, context_lens, num_blocks, num_kv_heads, block_size)
    out = paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, *pairs)

- Every page of a sequence but its *last* is full, so it needs no mask. Those pages form a flat,
  host-built list of (sequence, block) pairs, padded to a bucketed length, processed in a
  `fori_loop` over chunks of CHUNK pairs: gather K/V rows, q of each pair's sequence, per-page
  partial softmax (max m, sum l, unnormalized output o). Padding pairs read block 0 and belong to a
  dummy sequence whose partials are dropped, so NaN in block 0 cannot leak.
- Each sequence's last page (one per sequence, found on device from block_tables/context_lens) is
  done once with the position mask on the scores and a `where` on V (unused slots may hold NaN);
  a row with context_len 0 is all masked and returns zeros.
- Partials merge per sequence with segment_max / segment_sum (the flash-decoding reduction).
- The chunked loop keeps every temporary small (XLA CPU allocates each execution's temporaries
  anew, and big fresh allocations page-fault); p.v is a multiply-reduce because a batched dot
  contracting p's non-minor dimension takes a slow XLA CPU path.
Pairs are bucketed to 2 sizes per octave ({4, 6} x 2^k chunks) to bound compilations.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CHUNK = 64  # (seq, block) pairs per loop iteration

_PROMISE = lax.GatherScatterMode.PROMISE_IN_BOUNDS
_ROWS_DN = lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,))


# ----------------------------------------------------------------------------------------- host side
def bucket_size(n: int, minimum: int) -> int:
    """Round up to the next m * 2^k / 4 for m in {4, 6} (at most 1.5x padding, 2 sizes per octave)."""
    n = max(int(n), minimum)
    p = 1 << max(0, (n - 1).bit_length() - 1)
    for m in (4, 6):
        if p * m // 4 >= n:
            return p * m // 4
    return 2 * p


def build_decode_indices(block_tables, context_lens, num_blocks: int, num_kv_heads: int,
                         block_size: int = 16, chunk: int = CHUNK, min_chunks: int = 1):
    """Host-side (numpy) index arrays for paged_decode_attention_cpu.

    Returns (pseq i32[P], qidx i32[P//chunk, chunk], rows i32[P//chunk, num_kv_heads*chunk]) for the
    pairs (s, j), j < (context_lens[s]-1)//block_size, i.e. all pages of each sequence but its last,
    in sequence order. pseq/qidx: the pair's sequence (padding: num_seqs, a dummy); rows: the flat
    cache row kv*num_blocks + block_tables[s, j] (kv-major inside a chunk; padding: block 0).
    P = chunk * bucketed count (at least `min_chunks`, itself a bucket size: a caller padding to a
    larger compiled shape asks for its length), so only a few distinct shapes occur.
    """
    bt = np.asarray(block_tables)
    ctx = np.asarray(context_lens).astype(np.int64)
    S = bt.shape[0]
    nfull = np.maximum((ctx - 1) // block_size, 0)
    total = int(nfull.sum())
    nchunk = bucket_size(-(-total // chunk), min_chunks)
    P = nchunk * chunk
    seq = np.repeat(np.arange(S), nfull)
    j = np.arange(total) - np.repeat(np.cumsum(nfull) - nfull, nfull)
    pseq = np.full(P, S, np.int32)
    pseq[:total] = seq
    pblk = np.zeros(P, np.int32)
    pblk[:total] = bt[seq, j]
    rows = (np.arange(num_kv_heads, dtype=np.int32)[None, :, None] * num_blocks
            + pblk.reshape(nchunk, 1, chunk)).reshape(nchunk, num_kv_heads * chunk).astype(np.int32)
    return pseq, pseq.reshape(nchunk, chunk).copy(), rows


# --------------------------------------------------------------------------------------- device side
def gather_rows(flat, idx):
    """flat [R, W], idx i32[n] (in bounds) -> [n, W]: one row gather."""
    return lax.gather(flat, idx[:, None], _ROWS_DN, slice_sizes=(1, flat.shape[1]), mode=_PROMISE)


def _block_partials(qs, kg, vg, valid):
    """qs [KV,P,g,D] (pre-scaled q), kg/vg [KV,P,BS,D], valid None or bool[P,BS].
    Returns m [KV,P,g] (finite), l [KV,P,g], o [KV,P,g,D] (unnormalized, relative to m)."""
    s = lax.dot_general(kg, qs, (((3,), (3,)), ((0, 1), (0, 1))))  # [KV,P,BS,g]
    if valid is not None:
        s = jnp.where(valid[None, :, :, None], s, -jnp.inf)
    m = s.max(2)
    if valid is not None:
        m = jnp.where(jnp.isfinite(m), m, 0.0)  # fully masked block (padding row)
    p = jnp.exp(s - m[:, :, None, :])  # 0 where masked
    l = p.sum(2)
    if valid is not None:
        vg = jnp.where(valid[None, :, :, None], vg, 0.0)  # unused slots may hold NaN
    # p.v as a multiply-reduce: a batched dot contracting p's non-minor dim hits a slow XLA CPU path
    o = (p[..., None] * vg[:, :, :, None, :]).sum(2)  # [KV,P,g,D]
    return m, l, o


@jax.jit
def paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, pseq, qidx, rows):
    """q f32[S, num_heads, D]; k_cache/v_cache [num_kv_heads, num_blocks, block_size, D];
    block_tables i32[S, max_blocks]; context_lens i32[S] (0: padding row -> zeros);
    pseq, qidx, rows: from build_decode_indices. Returns [S, num_heads, D] in q's dtype."""
    S, NH, D = q.shape
    KV, NB, BS, _ = k_cache.shape
    g = NH // KV
    nchunk, C = qidx.shape
    P = nchunk * C
    qs = (q.astype(jnp.float32) * (1.0 / math.sqrt(D))).reshape(S, KV, g, D)
    qpad = jnp.concatenate([qs, jnp.zeros((1, KV, g, D), qs.dtype)], 0).reshape(S + 1, KV * g * D)
    kflat = k_cache.reshape(KV * NB, BS * D)
    vflat = v_cache.reshape(KV * NB, BS * D)

    # 1) all pages but each sequence's last: full, unmasked; chunked so temporaries stay in L2.
    def body(i, carry):
        m1, l1, o1 = carry
        r = rows[i]
        qp = gather_rows(qpad, qidx[i]).reshape(C, KV, g, D).transpose(1, 0, 2, 3)  # [KV,C,g,D]
        kg = gather_rows(kflat, r).reshape(KV, C, BS, D).astype(jnp.float32)
        vg = gather_rows(vflat, r).reshape(KV, C, BS, D).astype(jnp.float32)
        m, l, o = _block_partials(qp, kg, vg, None)
        return (lax.dynamic_update_slice(m1, m, (0, i * C, 0)),
                lax.dynamic_update_slice(l1, l, (0, i * C, 0)),
                lax.dynamic_update_slice(o1, o, (0, i * C, 0, 0)))

    init = (jnp.zeros((KV, P, g), jnp.float32), jnp.zeros((KV, P, g), jnp.float32),
            jnp.zeros((KV, P, g, D), jnp.float32))
    m1, l1, o1 = lax.fori_loop(0, nchunk, body, init)

    # 2) each sequence's last page, masked (S of them).
    jl = jnp.maximum(context_lens - 1, 0) // BS
    jl = jnp.minimum(jl, block_tables.shape[1] - 1)
    lblk = jnp.clip(jnp.take_along_axis(block_tables, jl[:, None], axis=1)[:, 0], 0, NB - 1)
    valid = jnp.arange(BS)[None, :] < (context_lens - jl * BS)[:, None]  # all False for ctx 0
    rows2 = ((jnp.arange(KV, dtype=jnp.int32) * NB)[:, None] + lblk[None, :]).reshape(-1)
    m2, l2, o2 = _block_partials(qs.transpose(1, 0, 2, 3),
                                 gather_rows(kflat, rows2).reshape(KV, S, BS, D).astype(jnp.float32),
                                 gather_rows(vflat, rows2).reshape(KV, S, BS, D).astype(jnp.float32), valid)

    # 3) merge partials per sequence (segment S is the padding dummy, dropped).
    M = jax.ops.segment_max(m1.transpose(1, 0, 2), pseq, num_segments=S + 1, indices_are_sorted=True)[:S]
    M = jnp.maximum(M, m2.transpose(1, 0, 2))  # [S,KV,g], finite
    Mp = jnp.take(jnp.concatenate([M, jnp.zeros((1, KV, g), M.dtype)]), pseq, axis=0)
    w1 = jnp.exp(m1.transpose(1, 0, 2) - Mp)  # [P,KV,g]
    L = jax.ops.segment_sum(l1.transpose(1, 0, 2) * w1, pseq, num_segments=S + 1, indices_are_sorted=True)[:S]
    O = jax.ops.segment_sum(o1.transpose(1, 0, 2, 3) * w1[..., None], pseq, num_segments=S + 1,
                            indices_are_sorted=True)[:S]
    w2 = jnp.exp(m2.transpose(1, 0, 2) - M)
    L = L + l2.transpose(1, 0, 2) * w2
    O = O + o2.transpose(1, 0, 2, 3) * w2[..., None]
    out = jnp.where(L[..., None] > 0, O / jnp.where(L > 0, L, 1.0)[..., None], 0.0)
    return out.reshape(S, NH, D).astype(q.dtype)
