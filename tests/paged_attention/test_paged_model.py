"""The model running on a paged KV cache gives exactly the naive-cache model's greedy tokens.

Blocks come from the real block manager with a fragmented free list, every unused cache slot holds
NaN (a leak shows up as NaN logits), and prompts of different lengths are prefilled in one ragged
step, then decoded one token per sequence per step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.llama import forward
from paged_attention.block_manager import BlockManager
from paged_attention.kv_cache import init_paged_kv_cache
from paged_attention.metadata import PagedMetadata

LENGTHS = [5, 13, 1, 8]
MAX_NEW = 9


def fragmented_manager(num_blocks: int, block_size: int) -> BlockManager:
    """A block manager whose free list is no longer in id order (tables will not be contiguous)."""
    manager = BlockManager(num_blocks, block_size)
    for seq_id in range(6):
        manager.allocate(-1 - seq_id, [7] * (block_size * (1 + seq_id % 2)))
    for seq_id in (1, 4, 2, 5, 3, 6):
        manager.free(-seq_id)
    return manager


def paged_greedy(model: models.Model, prompts, max_new: int, *, backend: str, block_size: int):
    config = model.config
    num_blocks, max_blocks = 64, 8
    manager = fragmented_manager(num_blocks, block_size)
    cache = [(jnp.full_like(k, jnp.nan), jnp.full_like(v, jnp.nan)) for k, v in init_paged_kv_cache(
        config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)]
    step = jax.jit(functools.partial(forward, config=config, backend=backend), donate_argnums=3)

    for seq_id in reversed(range(len(prompts))):  # allocation order differs from batch order
        manager.allocate(seq_id, prompts[seq_id])
    seq_ids = list(range(len(prompts)))
    lens = [len(p) for p in prompts]
    num_tokens = 32  # padded: 27 real prompt tokens
    metadata = PagedMetadata.build([manager.get_block_table(s) for s in seq_ids], lens, lens, block_size,
                                   num_tokens=num_tokens, num_seqs=4, max_blocks=max_blocks)
    tokens = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    tokens[:sum(lens)] = np.concatenate(prompts)
    positions[:sum(lens)] = np.concatenate([np.arange(n) for n in lens])
    last = np.asarray(metadata.query_start_loc)[1:] - 1
    logits, cache = step(model.params, jnp.asarray(tokens), jnp.asarray(positions), cache, metadata,
                         logits_indices=jnp.asarray(last))
    assert np.isfinite(np.asarray(logits)).all()
    outputs = [[t] for t in np.asarray(logits).argmax(-1).tolist()]
    for _ in range(max_new - 1):
        for s in seq_ids:
            _, copies = manager.append_slot(s, prompts[s] + outputs[s])
            assert copies == []  # nothing is shared here
        context = [manager.num_tokens(s) for s in seq_ids]
        metadata = PagedMetadata.build([manager.get_block_table(s) for s in seq_ids], context,
                                       [1] * len(seq_ids), block_size, max_blocks=max_blocks)
        assert metadata.decode_only
        logits, cache = step(model.params, jnp.asarray([o[-1] for o in outputs], jnp.int32),
                             jnp.asarray(context, jnp.int32) - 1, cache, metadata)
        assert np.isfinite(np.asarray(logits)).all()
        for s, token in enumerate(np.asarray(logits).argmax(-1).tolist()):
            outputs[s].append(token)
    tables = [manager.get_block_table(s) for s in seq_ids]
    assert any(np.any(np.diff(t) != 1) for t in tables if len(t) > 1), "tables should be fragmented"
    return outputs


@pytest.fixture(scope="module")
def prompts(tiny_model):
    rng = np.random.default_rng(7)
    return [rng.integers(3, tiny_model.config.vocab_size, size=n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def naive_tokens(tiny_model, prompts):
    return models.generate(tiny_model, prompts, max_new_tokens=MAX_NEW, ignore_eos=True)


@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_reference_backend_matches_naive_greedy(tiny_model, prompts, naive_tokens, block_size):
    got = paged_greedy(tiny_model, prompts, MAX_NEW, backend="paged_reference", block_size=block_size)
    assert got == naive_tokens


def test_paged_pallas_backend_matches_naive_greedy(tiny_model, prompts, naive_tokens):
    """The Pallas kernels (interpreted on CPU) inside the model."""
    got = paged_greedy(tiny_model, prompts, MAX_NEW, backend="paged", block_size=8)
    assert got == naive_tokens


def test_metadata_build_slots_and_padding():
    md = PagedMetadata.build([[5, 2], [7]], context_lens=[6, 3], query_lens=[2, 3], block_size=4,
                             num_tokens=8, num_seqs=3, max_blocks=3)
    # seq 0: positions 4, 5 -> block 2 (table[1]) offsets 0, 1; seq 1: positions 0..2 -> block 7
    assert np.asarray(md.slot_mapping).tolist() == [8, 9, 28, 29, 30, -1, -1, -1]
    assert np.asarray(md.query_start_loc).tolist() == [0, 2, 5, 5]
    assert np.asarray(md.context_lens).tolist() == [6, 3, 0]
    assert np.asarray(md.block_tables).tolist() == [[5, 2, 0], [7, 0, 0], [0, 0, 0]]
    assert not md.decode_only
    assert md.max_query_len == 4  # longest new chunk (3) rounded up to a power of two
    decode = PagedMetadata.build([[1], [2]], [3, 1], [1, 1], 4)
    assert decode.decode_only and decode.max_query_len == 1
    with pytest.raises(ValueError, match="exceed the padded sizes"):
        PagedMetadata.build([[1]], [5], [5], 4, num_tokens=4)
