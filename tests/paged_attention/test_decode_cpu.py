"""The XLA-CPU paged decode path against the dense reference: NaN in every unused cache slot,
stale block-table entries, padding rows (exactly zero), contexts of exactly one page and one page
plus a token, a page shared by two sequences, GQA groups of 1 and 3, block sizes 8 and 16."""

from __future__ import annotations

import numpy as np
import pytest

from paged_attention.decode_cpu import build_decode_indices, paged_decode_attention_cpu
from paged_attention.decode_kernel import paged_decode_attention_reference


def make_case(num_seqs, num_heads, num_kv_heads, block_size, seed, head_dim=16):
    rng = np.random.default_rng(seed)
    ctx = np.minimum(rng.gamma(1.2, 60 / 1.2, num_seqs).astype(int) + 1, 300).astype(np.int32)
    ctx[0] = block_size  # exactly one full page
    if num_seqs > 2:
        ctx[1] = block_size + 1  # a full page and a 1-token page
        ctx[-1] = 0  # padding row
    pages = (ctx + block_size - 1) // block_size
    num_blocks = max(16, int(pages.sum() * 1.5))
    width = 1 << max(0, int(max(1, pages.max()) - 1).bit_length())
    tables = rng.integers(0, num_blocks, (num_seqs, width)).astype(np.int32)  # stale entries beyond use
    perm, offset = rng.permutation(num_blocks), 0
    used = np.zeros((num_blocks, block_size), bool)
    for s in range(num_seqs):
        tables[s, :pages[s]] = perm[offset:offset + pages[s]]
        offset += pages[s]
        for t in range(ctx[s]):
            used[tables[s, t // block_size], t % block_size] = True
    if num_seqs > 2 and pages[1] >= 2:
        tables[1, 0] = tables[0, 0]  # a shared (prefix-cached) full page
    k = rng.standard_normal((num_kv_heads, num_blocks, block_size, head_dim)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    k[:, ~used] = np.nan
    v[:, ~used] = np.nan
    q = rng.standard_normal((num_seqs, num_heads, head_dim)).astype(np.float32)
    return q, k, v, tables, ctx


@pytest.mark.parametrize("num_seqs,num_heads,num_kv_heads,block_size", [
    (1, 3, 3, 16), (7, 9, 3, 16), (40, 9, 3, 16), (40, 4, 4, 8), (130, 6, 2, 16)])
def test_matches_the_dense_reference(num_seqs, num_heads, num_kv_heads, block_size):
    q, k, v, tables, ctx = make_case(num_seqs, num_heads, num_kv_heads, block_size, seed=num_seqs)
    pairs = build_decode_indices(tables, ctx, k.shape[1], num_kv_heads, block_size)
    out = np.asarray(paged_decode_attention_cpu(q, k, v, tables, ctx, *pairs))
    want = np.asarray(paged_decode_attention_reference(q, k, v, tables, ctx))
    assert not np.isnan(out).any()
    assert (out[ctx == 0] == 0).all()
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_pairs_list_every_full_page_and_pad_to_few_sizes():
    tables = np.array([[5, 6, 7, 0], [1, 2, 0, 0]], np.int32)
    pseq, qidx, rows = build_decode_indices(tables, np.array([40, 17]), num_blocks=8, num_kv_heads=2,
                                            block_size=16, chunk=4)
    # seq 0: pages 5, 6 full (page 7 is its last); seq 1: page 1 full; the rest padding (dummy seq 2)
    assert pseq.tolist() == [0, 0, 1, 2]
    assert rows.tolist() == [[5, 6, 1, 0, 13, 14, 9, 8]]  # kv head h reads row h * num_blocks + block
    sizes = {build_decode_indices(np.zeros((1, 64), np.int32), np.array([n * 16 + 1]), 64, 1, 16, 1)[0].size
             for n in range(1, 64)}
    assert sizes == {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64}
