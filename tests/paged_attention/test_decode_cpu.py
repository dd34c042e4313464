"""The XLA-CPU paged decode paths (the chunked loop and the one-gather path of small steps) against
the dense reference: NaN in every unused cache slot,
stale block-table entries, padding rows (exactly zero), contexts of exactly one page and one page
plus a token, a page shared by two sequences, GQA groups of 1 and 3, block sizes 8 and 16."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paged_attention.decode_cpu import build_decode_indices, paged_decode_attention_cpu
from paged_attention.decode_kernel import paged_decode_attention_reference
from paged_attention.kv_cache import write_kv


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


@pytest.mark.parametrize("dense_max_pages", [0, 10**9], ids=["chunked-loop", "one-gather"])
@pytest.mark.parametrize("num_seqs,num_heads,num_kv_heads,block_size", [
    (1, 3, 3, 16), (7, 9, 3, 16), (40, 9, 3, 16), (40, 4, 4, 8), (130, 6, 2, 16)])
def test_matches_the_dense_reference(num_seqs, num_heads, num_kv_heads, block_size, dense_max_pages):
    q, k, v, tables, ctx = make_case(num_seqs, num_heads, num_kv_heads, block_size, seed=num_seqs)
    pairs = build_decode_indices(tables, ctx, k.shape[1], num_kv_heads, block_size)
    out = np.asarray(paged_decode_attention_cpu(q, k, v, tables, ctx, *pairs, dense_max_pages=dense_max_pages))
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


def test_a_one_token_step_writes_the_cache_in_place():
    """A one-row scatter would become a dynamic-update-slice that XLA CPU copies the whole cache
    around (a batch-1 step's time then grows with the pool); write_kv pads it to two rows."""
    num_kv_heads, num_blocks, block_size, head_dim = 3, 64, 16, 8
    cache = tuple(jnp.zeros((num_kv_heads, num_blocks, block_size, head_dim)) for _ in range(2))
    tables, ctx = np.arange(4, dtype=np.int32)[None], np.array([40], np.int32)
    pairs = build_decode_indices(tables, ctx, num_blocks, num_kv_heads, block_size)

    def step(cache, k, v, q):
        cache = write_kv(cache, k, v, jnp.array([39]))
        return paged_decode_attention_cpu(q, *cache, tables, ctx, *pairs), cache

    k, v, q = jnp.ones((1, num_kv_heads, head_dim)), jnp.full((1, num_kv_heads, head_dim), 2.0), jnp.ones((1, 9, head_dim))
    compiled = jax.jit(step, donate_argnums=0).lower(cache, k, v, q).compile().as_text()
    cache_elements = num_kv_heads * num_blocks * block_size * head_dim
    copies = [line for line in compiled.splitlines() if " copy(" in line]
    shapes = [re.search(r"f32\[([\d,]+)\]", line).group(1) for line in copies]
    assert not [s for s in shapes if math.prod(map(int, s.split(","))) == cache_elements], copies
    _, (k_cache, v_cache) = jax.jit(step, donate_argnums=0)(tuple(jnp.zeros_like(c) for c in cache), k, v, q)
    assert float(k_cache[:, 2, 7].min()) == 1.0 and float(v_cache[:, 2, 7].min()) == 2.0  # slot 39 = block 2, row 7
    assert float(jnp.abs(k_cache).sum()) == num_kv_heads * head_dim  # nothing else written
