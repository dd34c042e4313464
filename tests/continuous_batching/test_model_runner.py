"""The paged model runner: shape buckets, decode vs prefill steps, copy-on-write, validation."""

from __future__ import annotations

import pytest

import models
from continuous_batching.model_runner import PagedModelRunner, SeqStep


@pytest.fixture
def runner(tiny_model):
    return PagedModelRunner(tiny_model, num_blocks=16, block_size=4, max_num_seqs=3, max_blocks_per_seq=4)


def test_buckets(runner):
    assert [runner.num_tokens_bucket(n, 3) for n in (1, 3, 4, 5, 9)] == [4, 4, 4, 8, 16]
    assert [runner.seq_bucket(n) for n in (1, 3, 5)] == [4, 4, 8]
    assert [runner.blocks_bucket(n) for n in (1, 3, 9)] == [4, 4, 4]  # capped at max_blocks_per_seq


def test_a_full_decode_step_uses_the_decode_kernel(runner):
    runner.step([SeqStep([i], 1, [5]) for i in range(3)])  # 3 sequences x 1 token, bucket 4
    assert runner.shapes_run == {(4, 4, 4, True)}


def test_prompt_then_decode_matches_naive(runner, tiny_model):
    prompt = [5, 9, 14, 3, 7, 8]
    expected = models.generate(tiny_model, [prompt], max_new_tokens=3, ignore_eos=True)[0]
    table = [2, 7]  # any blocks: 6 prompt tokens + 2 decoded fit in 2 blocks of 4
    got = runner.step([SeqStep(table, 6, prompt)]).tokens
    for context in (7, 8):
        got += runner.step([SeqStep(table, context, [got[-1]])]).tokens
    assert got == expected
    assert runner.shapes_run == {(8, 4, 4, False), (4, 4, 4, True)}  # one prompt bucket, one decode shape


def test_copy_on_write_copies_a_block(runner, tiny_model):
    runner.step([SeqStep([1, 2], 6, [5, 9, 14, 3, 7, 8])])
    runner.copy_blocks([(2, 9)])
    k, _ = runner.kv_cache[0]
    assert (k[:, 9] == k[:, 2]).all()  # [kv_heads, blocks, block_size, head_dim]


def test_step_validation(runner):
    with pytest.raises(ValueError, match="max_num_seqs=3"):
        runner.step([SeqStep([0], 1, [1])] * 4)
    with pytest.raises(ValueError, match="max_num_seqs=3"):
        runner.step([])
