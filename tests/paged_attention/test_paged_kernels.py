"""The paged KV cache and the paged decode / prefill kernels (interpret mode) against numpy.

Every case uses a *shuffled* page table (a random permutation of block ids spread over the
sequences), NaN in every cache slot no sequence owns, stale/garbage block-table entries past each
sequence's last page, GQA ratios 1 and 3, odd context lengths (1, a multiple of block_size, ...) and
block sizes 8 / 16 / 32. The expected output is dense attention in float64 numpy over the keys
gathered slot by slot through the block table.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paged_attention.decode_kernel import paged_decode_attention, paged_decode_attention_reference
from paged_attention.kv_cache import (copy_blocks, get_kv_cache_shape, init_paged_kv_cache, swap_in_blocks,
                                      swap_out_blocks, write_kv)
from paged_attention.prefill_kernel import paged_prefill_attention, paged_prefill_attention_reference

NUM_KV_HEADS = 2
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


# ----------------------------------------------------------------------------- test data


def paged_case(rng, context_lens, block_size, head_dim, spare_blocks=3, dtype=np.float32):
    """A NaN-filled cache holding random K/V for each sequence's first context_lens[s] positions.

    Returns k_cache, v_cache [kv_heads, num_blocks, block_size, head_dim] and block_tables
    i32[num_seqs, max_blocks] (with one extra column). Block ids are a random permutation; table
    entries past a sequence's last page point anywhere (-1, another sequence's page, a NaN page).
    """
    pages = [math.ceil(c / block_size) for c in context_lens]
    max_blocks = max(pages) + 1
    num_blocks = sum(pages) + spare_blocks
    ids = rng.permutation(num_blocks)
    tables = rng.integers(-1, num_blocks, size=(len(context_lens), max_blocks)).astype(np.int32)
    used = 0
    for s, n in enumerate(pages):
        tables[s, :n] = ids[used:used + n]
        used += n
    shape = get_kv_cache_shape(num_blocks, block_size, NUM_KV_HEADS, head_dim)
    k_cache, v_cache = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    for s, c in enumerate(context_lens):
        for p in range(c):
            block, offset = tables[s, p // block_size], p % block_size
            k_cache[:, block, offset] = rng.standard_normal((NUM_KV_HEADS, head_dim))
            v_cache[:, block, offset] = rng.standard_normal((NUM_KV_HEADS, head_dim))
    return k_cache.astype(dtype), v_cache.astype(dtype), tables


def gather_dense(cache, table, length, block_size) -> np.ndarray:
    """One sequence's keys (or values) in order, read slot by slot through its table: [length, kv_heads, d]."""
    cache = np.asarray(cache, np.float64)
    return np.stack([cache[:, table[p // block_size], p % block_size] for p in range(length)]) if length else \
        np.zeros((0, cache.shape[0], cache.shape[3]))


def dense_attention(q, k, v, q_positions) -> np.ndarray:
    """q: [q_len, heads, d]; k, v: [k_len, kv_heads, d]; query i sees keys at positions <= q_positions[i]."""
    q = np.asarray(q, np.float64)
    q_len, num_heads, head_dim = q.shape
    group = num_heads // NUM_KV_HEADS
    out = np.zeros(q.shape)
    for i in range(q_len):
        n = q_positions[i] + 1
        for h in range(num_heads):
            scores = k[:n, h // group] @ q[i, h] / np.sqrt(head_dim)
            w = np.exp(scores - scores.max())
            out[i, h] = (w / w.sum()) @ v[:n, h // group]
    return out


def expected_decode(q, k_cache, v_cache, tables, context_lens, block_size) -> np.ndarray:
    out = np.zeros(q.shape)
    for s, c in enumerate(context_lens):
        if c:
            k, v = (gather_dense(x, tables[s], c, block_size) for x in (k_cache, v_cache))
            out[s] = dense_attention(np.asarray(q)[s:s + 1], k, v, [c - 1])[0]
    return out


def expected_prefill(q, k_cache, v_cache, tables, context_lens, query_start_loc, block_size) -> np.ndarray:
    out = np.zeros(q.shape)  # padding tokens stay zero
    for s, c in enumerate(context_lens):
        lo, hi = query_start_loc[s], query_start_loc[s + 1]
        if hi > lo:
            k, v = (gather_dense(x, tables[s], c, block_size) for x in (k_cache, v_cache))
            out[lo:hi] = dense_attention(np.asarray(q)[lo:hi], k, v, np.arange(c - (hi - lo), c))
    return out


def assert_close(actual, expected, dtype):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    assert not np.isnan(actual).any(), "NaN leaked from unused cache slots"
    np.testing.assert_allclose(actual, expected, atol=TOL[dtype], rtol=TOL[dtype])


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("group", [1, 3])
def test_decode_kernel_and_reference_match_dense(block_size, group):
    rng = np.random.default_rng(block_size * 10 + group)
    head_dim = {8: 32, 16: 16, 32: 14}[block_size]  # 14: not a power of two (padded in the kernel)
    # 1, exactly one page, a padding row, odd lengths spanning several pages (and chunks)
    context_lens = np.array([1, block_size, 0, 2 * block_size + 3, block_size + 1], np.int32)
    k_cache, v_cache, tables = paged_case(rng, context_lens, block_size, head_dim)
    q = rng.standard_normal((len(context_lens), NUM_KV_HEADS * group, head_dim)).astype(np.float32)
    expected = expected_decode(q, k_cache, v_cache, tables, context_lens, block_size)
    args = tuple(map(jnp.asarray, (q, k_cache, v_cache, tables, context_lens)))

    # small chunks (16 tokens) so the online softmax crosses several chunk boundaries
    out = paged_decode_attention(*args, interpret=True, blocks_per_chunk=max(1, 16 // block_size))
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert_close(out, expected, jnp.float32)
    assert_close(paged_decode_attention_reference(*args), expected, jnp.float32)
    assert (np.asarray(out)[2] == 0).all()  # padding row


def test_decode_kernel_default_chunking_and_bf16():
    rng = np.random.default_rng(7)
    block_size, head_dim, group = 8, 32, 3
    context_lens = np.array([77, 5, 64], np.int32)  # > one default chunk (64 tokens), a whole chunk
    k_cache, v_cache, tables = paged_case(rng, context_lens, block_size, head_dim, dtype=jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((3, NUM_KV_HEADS * group, head_dim)), jnp.bfloat16)
    expected = expected_decode(np.asarray(q, np.float32), np.asarray(k_cache, np.float32),
                               np.asarray(v_cache, np.float32), tables, context_lens, block_size)
    args = (q, jnp.asarray(k_cache), jnp.asarray(v_cache), jnp.asarray(tables), jnp.asarray(context_lens))
    out = paged_decode_attention(*args, interpret=True)
    assert out.dtype == jnp.bfloat16
    assert_close(out, expected, jnp.bfloat16)
    assert_close(paged_decode_attention_reference(*args), expected, jnp.bfloat16)


def test_decode_kernel_matches_jax_bundled_paged_attention():
    """Same inputs as jax.experimental.pallas.ops.gpu.paged_attention (same k_pages layout).

    The bundled kernel does not scale the scores (callers pass q * 1/sqrt(head_dim)) and is not
    NaN-safe (it masks scores, not V, and reads whole pages), so this case fills unused slots with
    finite garbage instead of NaN.
    """
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    rng = np.random.default_rng(3)
    block_size, head_dim, group, pages_per_seq = 16, 32, 3, 4
    context_lens = np.array([33, 64, 7], np.int32)
    k_cache, v_cache, tables = paged_case(rng, context_lens, block_size, head_dim)
    k_cache, v_cache = (np.nan_to_num(x, nan=5.0) for x in (k_cache, v_cache))
    tables = np.where(tables[:, :pages_per_seq] < 0, 0, tables[:, :pages_per_seq]).astype(np.int32)
    q = rng.standard_normal((3, NUM_KV_HEADS * group, head_dim)).astype(np.float32)
    args = tuple(map(jnp.asarray, (q, k_cache, v_cache, tables, context_lens)))
    q_scaled = args[0] / np.sqrt(head_dim)
    theirs = paged_attention(q_scaled, *args[1:], block_h=16, pages_per_compute_block=2, k_splits=2, interpret=True)
    ours = paged_decode_attention(*args, interpret=True, blocks_per_chunk=2)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=2e-5, rtol=2e-5)
    assert_close(ours, expected_decode(q, k_cache, v_cache, tables, context_lens, block_size), jnp.float32)


# ----------------------------------------------------------------------------- prefill


def prefill_batch(block_size):
    """(context_lens, q_lens) for a ragged batch: a whole prompt, a chunk starting mid-sequence
    (earlier context from pages, start not page-aligned), a decode token at exactly one page, an
    empty (padding) sequence, a one-token prompt."""
    context_lens = np.array([block_size + 3, 2 * block_size + 1, block_size, 0, 1], np.int32)
    q_lens = np.array([block_size + 3, 5, 1, 0, 1])
    return context_lens, q_lens


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("group", [1, 3])
def test_prefill_kernel_and_reference_match_dense(block_size, group):
    rng = np.random.default_rng(block_size * 10 + group + 1)
    head_dim = {8: 16, 16: 32, 32: 14}[block_size]  # 14: not a power of two (padded in the kernel)
    context_lens, q_lens = prefill_batch(block_size)
    query_start_loc = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_tokens = int(query_start_loc[-1]) + 3  # three padding tokens at the end
    k_cache, v_cache, tables = paged_case(rng, context_lens, block_size, head_dim)
    q = rng.standard_normal((num_tokens, NUM_KV_HEADS * group, head_dim)).astype(np.float32)
    expected = expected_prefill(q, k_cache, v_cache, tables, context_lens, query_start_loc, block_size)
    args = tuple(map(jnp.asarray, (q, k_cache, v_cache, tables, context_lens, query_start_loc)))

    # 16-row q tiles (block_q * group_pad = 16): the whole prompt spans 2-3 tiles
    block_q = 16 if group == 1 else 4
    out = paged_prefill_attention(*args, interpret=True, max_query_len=int(q_lens.max()), block_q=block_q,
                                  blocks_per_chunk=max(1, 16 // block_size))
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert_close(out, expected, jnp.float32)
    assert_close(paged_prefill_attention_reference(*args), expected, jnp.float32)
    # the reference's per-sequence padded path (what the model uses on CPU), tight and loose bounds
    for bound in (int(q_lens.max()), 64):
        by_seq = paged_prefill_attention_reference(*args, max_query_len=bound)
        assert_close(by_seq, expected, jnp.float32)
        assert (np.asarray(by_seq)[query_start_loc[-1]:] == 0).all()
    assert (np.asarray(out)[query_start_loc[-1]:] == 0).all()  # padding tokens


def test_prefill_kernel_defaults_and_bf16():
    """Default tiling (max_query_len = num_tokens, so many empty tiles) in bf16, GQA 3."""
    rng = np.random.default_rng(11)
    block_size, head_dim, group = 16, 16, 3
    context_lens, q_lens = np.array([40, 19], np.int32), np.array([21, 19])
    query_start_loc = np.array([0, 21, 40], np.int32)
    k_cache, v_cache, tables = paged_case(rng, context_lens, block_size, head_dim, dtype=jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((41, NUM_KV_HEADS * group, head_dim)), jnp.bfloat16)
    expected = expected_prefill(np.asarray(q, np.float32), np.asarray(k_cache, np.float32),
                                np.asarray(v_cache, np.float32), tables, context_lens, query_start_loc,
                                block_size)
    args = (q, *map(jnp.asarray, (k_cache, v_cache, tables, context_lens, query_start_loc)))
    out = paged_prefill_attention(*args, interpret=True)
    assert out.dtype == jnp.bfloat16
    assert_close(out, expected, jnp.bfloat16)
    assert_close(paged_prefill_attention_reference(*args), expected, jnp.bfloat16)


# ----------------------------------------------------------------------------- kernels lower for GPU


@pytest.mark.parametrize("name", ["decode", "prefill"])
@pytest.mark.parametrize("head_dim, q_dtype", [(64, jnp.bfloat16), (14, jnp.float32)])
def test_kernels_lower_to_triton(name, head_dim, q_dtype):
    """Cross-lowering for CUDA on this CPU machine runs the Pallas->Triton lowering rules (power-of-two
    tensor sizes, equal dot operand types, supported primitives). It does not run Triton's own
    compiler; a GPU run does."""
    q_tokens = 4 if name == "decode" else 37
    q = jax.ShapeDtypeStruct((q_tokens, 6, head_dim), q_dtype)
    cache = jax.ShapeDtypeStruct((2, 50, 16, head_dim), jnp.bfloat16)
    tables, lens = jax.ShapeDtypeStruct((4, 7), jnp.int32), jax.ShapeDtypeStruct((4,), jnp.int32)
    if name == "decode":
        fn, args = paged_decode_attention, (q, cache, cache, tables, lens)
    else:
        fn, args = paged_prefill_attention, (q, cache, cache, tables, lens, jax.ShapeDtypeStruct((5,), jnp.int32))
    exported = jax.export.export(
        fn, platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


# ----------------------------------------------------------------------------- validation


def _decode_args():
    q = jnp.zeros((2, 6, 16))
    cache = jnp.zeros(get_kv_cache_shape(5, 8, NUM_KV_HEADS, 16))
    return dict(q=q, k_cache=cache, v_cache=cache, block_tables=jnp.zeros((2, 3), jnp.int32),
                context_lens=jnp.ones((2,), jnp.int32))


@pytest.mark.parametrize("fn", [paged_decode_attention, paged_decode_attention_reference,
                                paged_prefill_attention, paged_prefill_attention_reference])
@pytest.mark.parametrize("bad, match", [
    (dict(q=jnp.zeros((2, 6))), "q must"),
    (dict(q=jnp.zeros((2, 5, 16))), "q num_heads"),
    (dict(k_cache=jnp.zeros((NUM_KV_HEADS, 5, 8))), "k_cache must"),
    (dict(k_cache=jnp.zeros((NUM_KV_HEADS, 5, 8, 32)), v_cache=jnp.zeros((NUM_KV_HEADS, 5, 8, 32))),
     "k_cache head_dim"),
    (dict(v_cache=jnp.zeros((NUM_KV_HEADS, 6, 8, 16))), "v_cache shape"),
    (dict(v_cache=jnp.zeros((NUM_KV_HEADS, 5, 8, 16), jnp.bfloat16)), "v_cache dtype"),
    (dict(block_tables=jnp.zeros((2, 3), jnp.float32)), "block_tables must be int32"),
    (dict(block_tables=jnp.zeros((3, 3), jnp.int32)), "block_tables must be"),
    (dict(context_lens=jnp.ones((2,), jnp.float32)), "context_lens must be int32"),
    (dict(context_lens=jnp.ones((3,), jnp.int32)), "context_lens must be"),
])
def test_validation_names_the_argument(fn, bad, match):
    kwargs = {**_decode_args(), **bad}
    if fn in (paged_prefill_attention, paged_prefill_attention_reference):
        kwargs["query_start_loc"] = jnp.array([0, 1, 2], jnp.int32)
    with pytest.raises(ValueError, match=match):
        fn(**kwargs, interpret=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(blocks_per_chunk=1), "blocks_per_chunk"),  # 1 page of 8 tokens: Triton dot needs >= 16
    (dict(blocks_per_chunk=3), "blocks_per_chunk"),
])
def test_decode_validates_tuning(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(**_decode_args(), interpret=True, **kwargs)


@pytest.mark.parametrize("qsl, kwargs, match", [
    (jnp.array([0, 1, 2, 3], jnp.int32), {}, "block_tables must be"),  # 3 sequences vs 2 table rows
    (jnp.array([0, 1, 2], jnp.float32), {}, "query_start_loc must be int32"),
    (jnp.array([0, 1, 2], jnp.int32), dict(block_q=3), "block_q"),
    (jnp.array([0, 1, 2], jnp.int32), dict(block_q=2), "block_q"),  # 2 tokens * group_pad 4 = 8 rows
    (jnp.array([0, 1, 2], jnp.int32), dict(max_query_len=0), "max_query_len"),
])
def test_prefill_validates_query_start_loc_and_tuning(qsl, kwargs, match):
    with pytest.raises(ValueError, match=match):
        paged_prefill_attention(**_decode_args(), query_start_loc=qsl, interpret=True, **kwargs)


# ----------------------------------------------------------------------------- KV cache


def test_init_layout():
    cache = init_paged_kv_cache(3, num_blocks=7, block_size=8, num_kv_heads=2, head_dim=16, dtype=jnp.bfloat16)
    assert len(cache) == 3
    for k, v in cache:
        assert k.shape == v.shape == (2, 7, 8, 16) and k.dtype == jnp.bfloat16


def test_write_kv_places_tokens_through_slots_and_drops_padding():
    rng = np.random.default_rng(0)
    block_size, head_dim = 8, 16
    context_lens = np.array([13, 1, 8], np.int32)
    expected_k, expected_v, tables = paged_case(rng, context_lens, block_size, head_dim)
    # the same tokens, written by write_kv from a flattened batch with padding slots interleaved
    tokens = [(s, p) for s, c in enumerate(context_lens) for p in range(c)]
    order = rng.permutation(len(tokens))
    slots, ks, vs = [], [], []
    for i in order:
        s, p = tokens[i]
        block, offset = tables[s, p // block_size], p % block_size
        slots.append(block * block_size + offset)
        ks.append(expected_k[:, block, offset])
        vs.append(expected_v[:, block, offset])
        if len(slots) % 5 == 0:  # padding token: must be dropped, not written to the last slot
            slots.append(-1)
            ks.append(np.full((NUM_KV_HEADS, head_dim), 99.0, np.float32))
            vs.append(np.full((NUM_KV_HEADS, head_dim), 99.0, np.float32))
    shape = expected_k.shape
    cache = (jnp.full(shape, jnp.nan), jnp.full(shape, jnp.nan))
    write = jax.jit(write_kv, donate_argnums=0)  # as the model step uses it: in place
    k_cache, v_cache = write(cache, jnp.asarray(np.stack(ks)), jnp.asarray(np.stack(vs)),
                             jnp.asarray(slots, jnp.int32))
    np.testing.assert_array_equal(np.asarray(k_cache), expected_k)  # NaN where nothing was written
    np.testing.assert_array_equal(np.asarray(v_cache), expected_v)


def test_write_kv_casts_to_cache_dtype():
    cache = init_paged_kv_cache(1, 2, 4, 1, 16, jnp.bfloat16)[0]
    k = jnp.ones((1, 1, 16), jnp.float32) * 1.5
    k_cache, v_cache = write_kv(cache, k, 2 * k, jnp.array([5], jnp.int32))
    assert k_cache.dtype == jnp.bfloat16
    assert float(k_cache[0, 1, 1, 0]) == 1.5 and float(v_cache[0, 1, 1, 0]) == 3.0
    assert float(jnp.abs(k_cache).sum()) == 1.5 * 16


def _random_layers(rng, num_layers=2, shape=(2, 6, 4, 16)):
    return [tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in "kv") for _ in range(num_layers)]


def test_copy_blocks_every_layer():
    rng = np.random.default_rng(1)
    layers = _random_layers(rng)
    before = [(np.asarray(k), np.asarray(v)) for k, v in layers]
    src, dst = jnp.array([1, 4, 0], jnp.int32), jnp.array([3, 2, -1], jnp.int32)  # -1: padding, no copy
    after = copy_blocks(layers, src, dst)
    for (k0, v0), (k1, v1) in zip(before, after):
        for x0, x1 in ((k0, k1), (v0, v1)):
            want = x0.copy()
            want[:, 3], want[:, 2] = x0[:, 1], x0[:, 4]
            np.testing.assert_array_equal(np.asarray(x1), want)


def test_swap_out_and_in_round_trip():
    rng = np.random.default_rng(2)
    layers = _random_layers(rng)
    before = [(np.asarray(k), np.asarray(v)) for k, v in layers]
    host = swap_out_blocks(layers, np.array([2, 5], np.int32))
    assert all(isinstance(x, np.ndarray) and x.shape == (2, 2, 4, 16) for kv in host for x in kv)
    np.testing.assert_array_equal(host[1][1], before[1][1][:, [2, 5]])
    # the blocks come back to other ids (0 and 3), as after preemption
    restored = swap_in_blocks(init_paged_kv_cache(2, 6, 4, 2, 16), host, np.array([0, 3], np.int32))
    for (k0, v0), (k1, v1) in zip(before, restored):
        for x0, x1 in ((k0, k1), (v0, v1)):
            x1 = np.asarray(x1)
            np.testing.assert_array_equal(x1[:, [0, 3]], x0[:, [2, 5]])
            assert (x1[:, [1, 2, 4, 5]] == 0).all()
    with pytest.raises(ValueError, match="gpu_block_ids"):
        swap_in_blocks(layers, host, np.array([0], np.int32))
