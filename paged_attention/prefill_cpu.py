"""Packed ragged prefill attention written for XLA on CPU: exact, and its work and memory follow the
tokens actually in the step, not (sequences x longest prompt) x longest context.

`paged_prefill_attention_reference` with a static `max_query_len` pads every sequence's queries to
the step's longest prompt and its keys to the step's longest context: 64 prompts in a step whose
longest has 966 tokens cost 64 x 1,024 x 1,024 scores per head and layer (~16 GB of RSS, measured).
Here the host cuts each sequence's new tokens into *query tiles* of TILE_Q tokens (a tile never
spans two sequences) and lists the (tile, key chunk) pairs the causal mask leaves visible: a tile
whose last query sits at position p needs the key chunks 0 .. p // (KV_PAGES * block_size) of its
own sequence, nothing else. So a prompt of length L costs ~L^2 / 2 scores, as in FlashAttention.

Usage (host side once per model step, for all layers):
    pairs = build_prefill_indices(block_tables, context_lens, query_start_loc, num_tokens,
                                  num_blocks, num_kv_heads, block_size)
    out = paged_prefill_attention_cpu(q, k_cache, v_cache, *pairs)

Device side, like `decode_cpu`: a `fori_loop` over chunks of CHUNK pairs gathers each pair's query
tile and its KV_PAGES pages, computes the masked partial softmax (max m, sum l, unnormalized output
o), and the partials merge per tile with segment_max / segment_sum. Masking is by position: key
k is visible to query q iff pos(k) <= pos(q) (< context_len, so unwritten slots are never seen);
V is zeroed past the tile's last query position (unused slots may hold NaN). Padding tokens, tiles
and pairs belong to dummies whose results are dropped; padding tokens come back as zeros.
The pair list is padded to a power of two, but the loop stops after the real pairs: its bound is
an array, not a shape. Callers pass a tile count derived from their (bucketed) token and sequence
counts (`max_tiles`), so the tiles add no shape of their own.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from paged_attention.buckets import pow2_at_least, two_per_octave
from paged_attention.decode_cpu import gather_rows

TILE_Q = 32  # query tokens per tile (one sequence's)
KV_PAGES = 8  # pages per key chunk (128 keys at block_size 16)
CHUNK = 8  # (tile, key chunk) pairs per loop iteration
MIN_CHUNKS = 8  # pairs are padded to CHUNK x a power of two loop chunks, at least this many
_MASKED = -1e30  # the max of a row that sees no key in a pair: its weight exp(_MASKED - M) is 0


# ----------------------------------------------------------------------------------------- host side
def max_tiles(num_tokens: int, num_seqs: int, tile_q: int = TILE_Q) -> int:
    """An upper bound on the query tiles of num_seqs sequences holding num_tokens new tokens in all;
    callers whose token and sequence counts are already bucketed use it as the tile count, so the
    tiles add no shape of their own to compile."""
    return num_tokens // tile_q + num_seqs


def build_prefill_indices(block_tables, context_lens, query_start_loc, num_tokens: int, num_blocks: int,
                          num_kv_heads: int, block_size: int = 16, *, num_tiles: int | None = None,
                          tile_q: int = TILE_Q, kv_pages: int = KV_PAGES, chunk: int = CHUNK,
                          min_chunks: int = MIN_CHUNKS):
    """Host-side (numpy) index arrays for paged_prefill_attention_cpu.

    block_tables i32[S, max_blocks], context_lens i32[S] (after this step), query_start_loc
    i32[S + 1]; num_tokens is the padded length of q; num_tiles pads the tiles (default: bucketed).
    Returns
      tile_tokens i32[T, tile_q]: each tile's token indices into q (padding: num_tokens, a dummy);
      tile_pos    i32[T, tile_q]: their positions in the sequence (padding: -1, sees nothing);
      pair_tile   i32[P]: the tile of each (tile, key chunk) pair (padding: T, a dummy tile);
      pair_rows   i32[P // chunk, chunk * num_kv_heads * kv_pages]: the flat cache rows
                  kv * num_blocks + block of the pair's pages, ordered (pair, kv, page);
      pair_key0   i32[P]: position of the pair's first key (padding: a huge value, all masked);
      used_chunks i32[]: the loop chunks that hold real pairs (the rest is padding, skipped).
    P is chunk x a power of two (at least min_chunks), so few shapes compile.
    """
    bt = np.asarray(block_tables)
    ctx = np.asarray(context_lens).astype(np.int64)
    qsl = np.asarray(query_start_loc).astype(np.int64)
    chunk_keys = kv_pages * block_size
    tokens, positions, pair_tile, pair_blocks, pair_key0 = [], [], [], [], []
    for s in range(bt.shape[0]):
        q_len = int(qsl[s + 1] - qsl[s])
        first_pos = int(ctx[s]) - q_len
        for start in range(0, max(q_len, 0), tile_q):
            n = min(tile_q, q_len - start)
            tile = len(tokens)
            tokens.append(np.pad(qsl[s] + start + np.arange(n), (0, tile_q - n), constant_values=num_tokens))
            positions.append(np.pad(first_pos + start + np.arange(n), (0, tile_q - n), constant_values=-1))
            num_chunks = (first_pos + start + n - 1) // chunk_keys + 1
            pages = np.zeros(num_chunks * kv_pages, np.int64)  # past the table: block 0, masked by position
            avail = min(len(pages), bt.shape[1])
            pages[:avail] = bt[s, :avail]
            pair_tile += [tile] * num_chunks
            pair_blocks.append(pages.reshape(num_chunks, kv_pages))
            pair_key0.extend(range(0, num_chunks * chunk_keys, chunk_keys))
    if num_tiles is None:
        num_tiles = two_per_octave(len(tokens), 1)
    elif num_tiles < len(tokens):
        raise ValueError(f"num_tiles={num_tiles} < the {len(tokens)} tiles these sequences need")
    used_chunks = -(-len(pair_tile) // chunk)
    num_pairs = chunk * max(min_chunks, pow2_at_least(used_chunks))
    tile_tokens = np.full((num_tiles, tile_q), num_tokens, np.int32)
    tile_pos = np.full((num_tiles, tile_q), -1, np.int32)
    if tokens:
        tile_tokens[:len(tokens)] = tokens
        tile_pos[:len(tokens)] = positions
    tiles = np.full(num_pairs, num_tiles, np.int32)
    tiles[:len(pair_tile)] = pair_tile
    key0 = np.full(num_pairs, np.iinfo(np.int32).max // 2, np.int32)
    key0[:len(pair_key0)] = pair_key0
    blocks = np.zeros((num_pairs, kv_pages), np.int64)
    if pair_blocks:
        blocks[:len(pair_tile)] = np.concatenate(pair_blocks)
    rows = np.arange(num_kv_heads)[None, :, None] * num_blocks + blocks[:, None, :]  # [P, kv, pages]
    rows = rows.reshape(num_pairs // chunk, chunk * num_kv_heads * kv_pages).astype(np.int32)
    return tile_tokens, tile_pos, tiles, rows, key0, np.int32(used_chunks)


# --------------------------------------------------------------------------------------- device side
def _pair_partials(qt, qpos, kg, vg, key_pos):
    """qt [C,KV,R,D] (pre-scaled, R = tile_q * group, row r = query r // group), qpos i32[C,tile_q],
    kg/vg [C,KV,K,D], key_pos i32[C,K]. Returns m [C,KV,R] (_MASKED where a row sees nothing),
    l [C,KV,R], o [C,KV,R,D] (unnormalized, relative to m)."""
    group = qt.shape[2] // qpos.shape[1]
    row_pos = jnp.repeat(qpos, group, axis=1)  # i32[C, R]
    visible = key_pos[:, None, :] <= row_pos[:, :, None]  # bool[C, R, K]
    s = lax.dot_general(qt, kg, (((3,), (3,)), ((0, 1), (0, 1))))  # [C,KV,R,K]
    s = jnp.where(visible[:, None], s, -jnp.inf)
    m = s.max(3)
    m = jnp.where(jnp.isfinite(m), m, _MASKED)
    p = jnp.exp(s - m[..., None])  # 0 where masked
    l = p.sum(3)
    seen = key_pos <= qpos.max(1, keepdims=True)  # bool[C, K]: written slots no later than the tile
    vg = jnp.where(seen[:, None, :, None], vg, 0.0)
    o = lax.dot_general(p, vg, (((3,), (2,)), ((0, 1), (0, 1))))  # [C,KV,R,D]
    return m, l, o


@jax.jit
def paged_prefill_attention_cpu(q, k_cache, v_cache, tile_tokens, tile_pos, pair_tile, pair_rows, pair_key0,
                                used_chunks):
    """q [num_tokens, num_heads, D]; k_cache/v_cache [num_kv_heads, num_blocks, block_size, D] (this
    step's K/V already written); the rest from build_prefill_indices. Returns [num_tokens, num_heads, D]
    in q's dtype, zeros for tokens no tile owns (padding)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv, num_blocks, block_size, _ = k_cache.shape
    group = num_heads // num_kv
    num_tiles, tile_q = tile_tokens.shape
    num_chunks = pair_rows.shape[0]
    chunk = pair_tile.shape[0] // num_chunks
    keys = pair_rows.shape[1] // (chunk * num_kv) * block_size
    rows_per_tile = tile_q * group

    qs = (q.astype(jnp.float32) * (1.0 / math.sqrt(head_dim))).reshape(num_tokens, num_kv, group, head_dim)
    qs = jnp.concatenate([qs, jnp.zeros((1, num_kv, group, head_dim), qs.dtype)])  # token num_tokens: dummy
    qt = qs[tile_tokens].transpose(0, 2, 1, 3, 4)  # [T, KV, tile_q, g, D]
    qt = jnp.concatenate([qt, jnp.zeros((1,) + qt.shape[1:], qt.dtype)])  # tile T: dummy
    qt_flat = qt.reshape(num_tiles + 1, num_kv * rows_per_tile * head_dim)
    pos = jnp.concatenate([tile_pos, jnp.full((1, tile_q), -1, tile_pos.dtype)])  # i32[T + 1, tile_q]
    kflat = k_cache.reshape(num_kv * num_blocks, block_size * head_dim)
    vflat = v_cache.reshape(num_kv * num_blocks, block_size * head_dim)

    def body(i, carry):
        m1, l1, o1 = carry
        tiles = lax.dynamic_slice_in_dim(pair_tile, i * chunk, chunk)
        key_pos = lax.dynamic_slice_in_dim(pair_key0, i * chunk, chunk)[:, None] + jnp.arange(keys)
        qp = gather_rows(qt_flat, tiles).reshape(chunk, num_kv, rows_per_tile, head_dim)
        kg = gather_rows(kflat, pair_rows[i]).reshape(chunk, num_kv, keys, head_dim).astype(jnp.float32)
        vg = gather_rows(vflat, pair_rows[i]).reshape(chunk, num_kv, keys, head_dim).astype(jnp.float32)
        m, l, o = _pair_partials(qp, jnp.take(pos, tiles, axis=0), kg, vg, key_pos)
        return (lax.dynamic_update_slice_in_dim(m1, m, i * chunk, 0),
                lax.dynamic_update_slice_in_dim(l1, l, i * chunk, 0),
                lax.dynamic_update_slice_in_dim(o1, o, i * chunk, 0))

    num_pairs = pair_tile.shape[0]
    init = (jnp.zeros((num_pairs, num_kv, rows_per_tile), jnp.float32),
            jnp.zeros((num_pairs, num_kv, rows_per_tile), jnp.float32),
            jnp.zeros((num_pairs, num_kv, rows_per_tile, head_dim), jnp.float32))
    m1, l1, o1 = lax.fori_loop(0, jnp.minimum(used_chunks, num_chunks), body, init)  # padding chunks: skipped

    # merge the partials per tile (segment num_tiles is the padding dummy, dropped)
    seg = dict(segment_ids=pair_tile, num_segments=num_tiles + 1, indices_are_sorted=True)
    big_m = jax.ops.segment_max(m1, **seg)  # [T + 1, KV, R]
    w = jnp.exp(m1 - big_m[pair_tile])
    big_l = jax.ops.segment_sum(l1 * w, **seg)
    big_o = jax.ops.segment_sum(o1 * w[..., None], **seg)
    out = jnp.where(big_l[..., None] > 0, big_o / jnp.where(big_l > 0, big_l, 1.0)[..., None], 0.0)
    out = out[:num_tiles].reshape(num_tiles, num_kv, tile_q, group, head_dim).transpose(0, 2, 1, 3, 4)
    out = out.reshape(num_tiles * tile_q, num_heads, head_dim)
    flat = jnp.zeros((num_tokens + 1, num_heads, head_dim), jnp.float32).at[tile_tokens.reshape(-1)].set(out)
    return flat[:num_tokens].astype(q.dtype)
