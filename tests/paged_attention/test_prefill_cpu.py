"""The packed XLA-CPU prefill path against the jnp reference: ragged chunks (whole prompts, later
chunks over an earlier context, single decode tokens) in one step, NaN in every unused cache slot,
stale block-table entries, padding tokens and rows, tiles that end mid-sequence, GQA groups of 1
and 3, block sizes 8 and 16, and a tile/key-chunk geometry small enough that many pairs mask."""

from __future__ import annotations

import numpy as np
import pytest

from paged_attention.prefill_cpu import build_prefill_indices, max_tiles, paged_prefill_attention_cpu
from paged_attention.prefill_kernel import paged_prefill_attention_reference


def make_case(q_lens, ctx_lens, num_heads, num_kv_heads, block_size, seed, head_dim=16, pad_tokens=5,
              pad_rows=1):
    """q_lens new tokens per sequence at the end of ctx_lens cached tokens; NaN in unused slots."""
    rng = np.random.default_rng(seed)
    q_lens = np.array(list(q_lens) + [0] * pad_rows)
    ctx = np.array(list(ctx_lens) + [0] * pad_rows, np.int32)
    pages = (ctx + block_size - 1) // block_size
    num_blocks = max(16, int(pages.sum() * 1.5))
    width = 1 << max(0, int(max(1, pages.max()) - 1).bit_length())
    tables = rng.integers(0, num_blocks, (len(ctx), width)).astype(np.int32)  # stale beyond use
    perm, offset = rng.permutation(num_blocks), 0
    used = np.zeros((num_blocks, block_size), bool)
    for s in range(len(ctx)):
        tables[s, :pages[s]] = perm[offset:offset + pages[s]]
        offset += pages[s]
        for t in range(ctx[s]):
            used[tables[s, t // block_size], t % block_size] = True
    k = rng.standard_normal((num_kv_heads, num_blocks, block_size, head_dim)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    k[:, ~used] = np.nan
    v[:, ~used] = np.nan
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((int(qsl[-1]) + pad_tokens, num_heads, head_dim)).astype(np.float32)
    return q, k, v, tables, ctx, qsl


CASES = {  # (q_lens, ctx_lens)
    "one prompt": ([37], [37]),
    "prompts and decodes": ([70, 1, 16, 33, 1], [70, 90, 16, 33, 5]),
    "chunks over a context": ([64, 20, 3], [200, 150, 131]),
    "long prompt": ([300], [300]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("num_heads,num_kv_heads,block_size", [(9, 3, 16), (4, 4, 8)])
@pytest.mark.parametrize("tile_q,kv_pages,chunk", [(32, 8, 8), (8, 2, 3)])
def test_matches_the_reference(case, num_heads, num_kv_heads, block_size, tile_q, kv_pages, chunk):
    q_lens, ctx_lens = CASES[case]
    q, k, v, tables, ctx, qsl = make_case(q_lens, ctx_lens, num_heads, num_kv_heads, block_size, seed=len(q_lens))
    pairs = build_prefill_indices(tables, ctx, qsl, q.shape[0], k.shape[1], num_kv_heads, block_size,
                                  num_tiles=max_tiles(q.shape[0], len(ctx), tile_q), tile_q=tile_q,
                                  kv_pages=kv_pages, chunk=chunk)
    out = np.asarray(paged_prefill_attention_cpu(q, k, v, *pairs))
    want = np.asarray(paged_prefill_attention_reference(q, k, v, tables, ctx, qsl))
    assert not np.isnan(out).any()
    assert (out[qsl[-1]:] == 0).all()  # padding tokens
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


def test_pairs_follow_the_causal_mask_and_pad_to_few_sizes():
    tables = np.array([[5, 6, 7, 0], [1, 2, 0, 0]], np.int32)
    # seq 0: 40 new tokens after 0 cached; seq 1: 3 new tokens at positions 30..32
    tile_tokens, tile_pos, pair_tile, rows, key0, used_chunks = build_prefill_indices(
        tables, np.array([40, 33]), np.array([0, 40, 43]), num_tokens=48, num_blocks=8, num_kv_heads=2,
        block_size=16, tile_q=16, kv_pages=1, chunk=4, min_chunks=1)
    # tiles: seq 0 queries 0-15, 16-31, 32-39 (padded), seq 1 queries 30-32 (padded)
    assert tile_pos[:4, 0].tolist() == [0, 16, 32, 30] and tile_pos[2, 8:].tolist() == [-1] * 8
    assert tile_tokens[3, :4].tolist() == [40, 41, 42, 48]  # 48: the dummy token
    # tile 0 sees page 0; tile 1 pages 0-1; tile 2 pages 0-2; tile 3 (positions 30..32) pages 0-2
    assert pair_tile[:9].tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3]
    assert key0[:9].tolist() == [0, 0, 16, 0, 16, 32, 0, 16, 32]
    assert pair_tile.shape == (16,) and (pair_tile[9:] == tile_pos.shape[0]).all()  # 4 chunks of 4, dummy tile
    assert used_chunks == 3  # the loop skips the last, all-padding chunk
    # rows: (pair, kv head) -> h * num_blocks + block, 4 pairs per loop chunk
    assert rows[1].tolist() == [6, 14, 7, 15, 1, 9, 2, 10]
    assert rows[2][:2].tolist() == [0, 8]  # seq 1's third page: its (unused) table entry, masked by position


def test_too_few_tiles_is_an_error():
    with pytest.raises(ValueError, match="num_tiles=1"):
        build_prefill_indices(np.zeros((1, 4), np.int32), [40], [0, 40], 48, 8, 2, 16, num_tiles=1, tile_q=16)
