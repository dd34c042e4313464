"""The paged model runner: shape buckets, decode vs prefill steps, copy-on-write, validation."""

from __future__ import annotations

import numpy as np
import pytest

import models
from continuous_batching.model_runner import PagedModelRunner
from continuous_batching.request import Sequence

in_cache = Sequence.in_cache  # a sequence whose earlier tokens are in the cache, bringing new ones


@pytest.fixture
def runner(tiny_model):
    return PagedModelRunner(tiny_model, num_blocks=16, block_size=4, max_num_seqs=3, max_blocks_per_seq=4,
                            backend="paged_reference")


def test_buckets(runner):
    assert [runner.seq_bucket(n) for n in (1, 3, 5)] == [1, 4, 8]
    assert [runner.blocks_bucket(n) for n in (1, 3, 9)] == [4, 4, 4]  # capped at max_blocks_per_seq


def test_a_full_decode_step_uses_the_decode_kernel(runner):
    runner.step([in_cache([i], 1, [5]) for i in range(3)])  # 3 sequences x 1 token, bucket 4
    assert runner.shapes_run == {(0, 0, 4, 4, 0, 0)}  # no CPU index lists on this backend


def test_prompt_then_decode_matches_naive(runner, tiny_model):
    prompt = [5, 9, 14, 3, 7, 8]
    expected = models.generate(tiny_model, [prompt], max_new_tokens=3, ignore_eos=True)[0]
    table = [2, 7]  # any blocks: 6 prompt tokens + 2 decoded fit in 2 blocks of 4
    got = runner.step([in_cache(table, 6, prompt)]).tokens
    for context in (7, 8):
        got += runner.step([in_cache(table, context, [got[-1]])]).tokens
    assert got == expected
    assert runner.shapes_run == {(16, 1, 0, 4, 0, 0), (0, 0, 1, 4, 0, 0)}  # one prompt bucket, one decode shape (a lone sequence: 1 row)


def test_copy_on_write_copies_a_block(runner, tiny_model):
    runner.step([in_cache([1, 2], 6, [5, 9, 14, 3, 7, 8])])
    runner.copy_blocks([(2, 9)])
    k, _ = runner.kv_cache[0]
    assert (k[:, 9] == k[:, 2]).all()  # [kv_heads, blocks, block_size, head_dim]


def test_step_validation(runner):
    with pytest.raises(ValueError, match="max_num_seqs=3"):
        runner.step([in_cache([0], 1, [1])] * 4)
    with pytest.raises(ValueError, match="max_num_seqs=3"):
        runner.step([])


def test_a_mixed_step_splits_prompts_and_decodes_and_keeps_the_callers_order(runner, tiny_model):
    """Decode rows go to the decode kernel, prompt rows to the prefill kernel; results come back in
    the order the sequences were given, and equal what each gets alone."""
    prompts = [[5, 9, 14, 3, 7, 8], [11, 12, 13]]
    expected = models.generate(tiny_model, prompts, max_new_tokens=2, ignore_eos=True)
    first = runner.step([in_cache([0, 1], 6, prompts[0])]).tokens  # seq 0's prompt alone
    mixed = runner.step([in_cache([0, 1], 7, first), in_cache([4], 3, prompts[1])]).tokens
    assert (first + mixed[:1], mixed[1:]) == (expected[0], expected[1][:1])
    assert (16, 1, 1, 4, 0, 0) in runner.shapes_run  # 3 prompt tokens padded to 16, 1 prefill row, 1 decode row


def test_every_backend_runs_split_steps_like_the_reference(tiny_model):
    """The same mixed step through the Pallas kernels (interpreted on CPU), the XLA-CPU decode path,
    the packed CPU prefill and the jnp references."""
    tokens = {}
    for backend in ("paged", "paged_cpu", "paged_reference"):
        runner = PagedModelRunner(tiny_model, num_blocks=16, block_size=4, max_num_seqs=3, max_blocks_per_seq=4,
                                  backend=backend)
        first = runner.step([in_cache([0, 1], 6, [5, 9, 14, 3, 7, 8])]).tokens
        tokens[backend] = first + runner.step([in_cache([0, 1], 7, first), in_cache([4], 3, [11, 12, 13])]).tokens
    assert tokens["paged"] == tokens["paged_cpu"] == tokens["paged_reference"]


def test_packed_cpu_prefill_spans_several_tiles_and_key_chunks(tiny_model):
    """Prompts long enough for several 32-token query tiles and 32-key chunks (8 pages of 4), a later
    chunk over an earlier context, next to a decode: the `paged_cpu` runner samples what the jnp
    reference does, and builds its tile lists."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 263, n).tolist() for n in (75, 40)]
    tokens = {}
    for backend in ("paged_cpu", "paged_reference"):
        runner = PagedModelRunner(tiny_model, num_blocks=64, block_size=4, max_num_seqs=3, max_blocks_per_seq=32,
                                  backend=backend)
        tables = [list(range(0, 24)), list(range(24, 40))]
        first = runner.step([in_cache(tables[0], 75, prompts[0]), in_cache(tables[1], 20, prompts[1][:20])]).tokens
        second = runner.step([in_cache(tables[0], 76, first[:1]), in_cache(tables[1], 40, prompts[1][20:])]).tokens
        tokens[backend] = first[:1] + second
        assert all(len(shape) == 6 for shape in runner.shapes_run)
    assert tokens["paged_cpu"] == tokens["paged_reference"]
    expected = models.generate(tiny_model, prompts, max_new_tokens=2, ignore_eos=True)
    assert tokens["paged_cpu"] == [expected[0][0], expected[0][1], expected[1][0]]


def test_the_step_takes_its_rope_tables_from_the_host(tiny_model):
    """The compiled step computes no sin / cos: traced in the step, XLA CPU fused them into every
    fusion of every layer that reads the tables, computing them again in each."""
    runner = PagedModelRunner(tiny_model, num_blocks=16, block_size=4, max_num_seqs=3, max_blocks_per_seq=4,
                              backend="paged_cpu")
    prepared = runner.prepare([in_cache([2, 7], 6, [5, 9, 14, 3, 7, 8]), in_cache([3], 2, [4])])
    hlo = runner.lower(prepared).compile().as_text()
    assert "sine(" not in hlo and "cosine(" not in hlo
