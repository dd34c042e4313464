"""The block manager (pure Python, no JAX): hand-checked tables and slots, ref counts, copy-on-write,
prefix caching with LRU eviction, swapping, and a seeded random stress test that checks the
invariants, and the KV contents a runner following the returned copies would see, after every op."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from paged_attention.block_manager import BlockAllocator, BlockManager, NoFreeBlocksError


# ----- helpers -------------------------------------------------------------------------------------
class TrackedBlockManager(BlockManager):
    """The block manager plus the token lists its callers' sequences own (the manager keeps only
    counts): `append_slot(seq_id, token)` appends to the caller's list and hands the manager the
    whole list, as the scheduler does with `seq.tokens`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_ids: dict[int, list[int]] = {}

    def allocate(self, seq_id, token_ids):
        cached = super().allocate(seq_id, token_ids)
        self.token_ids[seq_id] = list(token_ids)
        return cached

    def append_slot(self, seq_id, token):
        tokens = self.token_ids[seq_id] + [token] if seq_id in self.block_tables else [token]
        result = super().append_slot(seq_id, tokens)
        self.token_ids[seq_id] = tokens
        return result

    def fork(self, parent_id, child_id):
        super().fork(parent_id, child_id)
        self.token_ids[child_id] = list(self.token_ids[parent_id])

    def free(self, seq_id):
        super().free(seq_id)
        del self.token_ids[seq_id]


def check_pool(pool: BlockAllocator, tables: dict[int, list[int]]) -> None:
    """Ref counts equal the (sequence, block) references; every block is exactly one of
    free / evictable / used; the hash table and the per-block keys agree."""
    refs = Counter(b for table in tables.values() for b in table)
    assert all(r >= 0 for r in pool.ref_counts)
    assert pool.ref_counts == [refs[b] for b in range(pool.num_blocks)]
    free, evictable = list(pool.free_ids), list(pool.evictable)
    used = {b for b in range(pool.num_blocks) if pool.ref_counts[b] > 0}
    assert len(set(free)) == len(free), "a block is on the free list twice"
    assert not (set(free) & set(evictable)) and not (set(free) | set(evictable)) & used
    assert set(free) | set(evictable) | used == set(range(pool.num_blocks))
    assert not set(free) & set(pool.block_key), "a free block still has a hash"
    assert set(evictable) <= set(pool.block_key)
    assert {hash(k): b for b, k in pool.block_key.items()} == pool.hash_to_block


def check(bm: BlockManager) -> None:
    check_pool(bm.gpu, bm.block_tables)
    check_pool(bm.cpu, bm.cpu_tables)
    assert not set(bm.block_tables) & set(bm.cpu_tables)
    assert set(bm.block_tables) | set(bm.cpu_tables) == set(bm.token_ids)
    for seq_id, tokens in bm.token_ids.items():
        table = bm.block_tables.get(seq_id, bm.cpu_tables.get(seq_id))
        assert len(table) == -(-len(tokens) // bm.block_size)
        if bm.enable_prefix_caching:
            assert len(bm.block_hashes[seq_id]) == len(tokens) // bm.block_size
    assert bm.num_free_blocks + bm.num_used_blocks == bm.gpu.num_blocks


def snapshot(bm: BlockManager):
    pools = [(list(p.ref_counts), list(p.free_ids), list(p.evictable), dict(p.hash_to_block))
             for p in (bm.gpu, bm.cpu)]
    return (pools, {k: list(v) for k, v in bm.block_tables.items()}, {k: list(v) for k, v in bm.cpu_tables.items()},
            {k: list(v) for k, v in bm.token_ids.items()}, bm.prefix_hits, bm.prefix_misses)


def all_free(bm: BlockManager) -> bool:
    """Every GPU and CPU block released exactly once: free list (+ evictable) == all blocks."""
    check(bm)
    for pool in (bm.gpu, bm.cpu):
        released = list(pool.free_ids) + list(pool.evictable)
        if sorted(released) != list(range(pool.num_blocks)) or any(pool.ref_counts):
            return False
    return True


# ----- construction and plain allocation -----------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [
    ({"num_blocks": 0}, "num_blocks"), ({"num_blocks": 2.0}, "num_blocks"),
    ({"num_blocks": 4, "block_size": 0}, "block_size"), ({"num_blocks": 4, "block_size": True}, "block_size"),
    ({"num_blocks": 4, "num_cpu_blocks": -1}, "num_cpu_blocks"),
    ({"num_blocks": 4, "enable_prefix_caching": 1}, "enable_prefix_caching"),
])
def test_constructor_validates_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockManager(**kwargs)


def test_default_block_size_is_16():
    bm = TrackedBlockManager(4)
    bm.allocate(0, list(range(17)))
    assert bm.block_size == 16 and bm.get_block_table(0) == [0, 1] and bm.get_slot(0, 16) == 16


def test_block_tables_and_slots_by_hand():
    bm = TrackedBlockManager(num_blocks=8, block_size=4)
    assert bm.allocate(0, [10, 11, 12, 13, 14, 15]) == 0
    assert bm.get_block_table(0) == [0, 1]
    assert [bm.get_slot(0, p) for p in range(6)] == [0, 1, 2, 3, 4, 5]
    assert bm.allocate(1, [20, 21, 22]) == 0
    assert bm.get_block_table(1) == [2]
    assert bm.append_slot(0, 16) == (6, [])
    assert bm.append_slot(0, 17) == (7, [])
    assert bm.append_slot(0, 18) == (12, [])  # block 1 full: a new block 3
    assert bm.get_block_table(0) == [0, 1, 3]
    assert bm.append_slot(1, 23) == (11, [])  # fills block 2 in place
    assert bm.append_slot(1, 24) == (16, [])  # new block 4
    assert bm.get_block_table(1) == [2, 4]
    assert (bm.num_tokens(0), bm.num_tokens(1)) == (9, 5)
    assert bm.token_ids[0] == [10, 11, 12, 13, 14, 15, 16, 17, 18]
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.num_real_tokens) == (5, 3, 14)
    bm.free(0)
    assert bm.num_free_blocks == 6 and list(bm.gpu.free_ids) == [5, 6, 7, 3, 1, 0]  # last block first
    bm.allocate(2, [1] * 9)
    assert bm.get_block_table(2) == [5, 6, 7]
    check(bm)


def test_get_slot_and_allocate_reject_bad_input():
    bm = TrackedBlockManager(4, block_size=4)
    bm.allocate(0, [1, 2, 3])
    with pytest.raises(IndexError):
        bm.get_slot(0, 3)
    with pytest.raises(IndexError):
        bm.get_slot(0, -1)
    with pytest.raises(ValueError, match="already"):
        bm.allocate(0, [1])
    with pytest.raises(ValueError, match="empty"):
        bm.allocate(1, [])
    with pytest.raises(ValueError, match="already"):
        bm.fork(0, 0)
    with pytest.raises(KeyError):
        bm.free(7)
    check(bm)


def test_the_manager_reads_the_callers_tokens_and_keeps_only_counts():
    """No token copy inside: `append_slot` takes the sequence's tokens (the new one last), checks
    their count, and hashes a block it fills from them."""
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    tokens = [5, 6, 7]
    bm.allocate(0, tokens)
    assert not hasattr(bm, "token_ids") and bm.num_tokens(0) == 3
    with pytest.raises(ValueError, match="needs its 4 token ids"):
        bm.append_slot(0, tokens)  # the new token is missing
    assert bm.num_tokens(0) == 3
    tokens.append(8)
    bm.append_slot(0, tokens)  # fills block 1 with (7, 8): cached under those ids
    bm.free(0)
    assert bm.allocate(1, [5, 6, 7, 8, 9]) == 4  # both full blocks found again


# ----- exhaustion -----------------------------------------------------------------------------------
def test_exhaustion_reports_cannot_allocate_and_changes_nothing():
    bm = TrackedBlockManager(num_blocks=3, block_size=4)
    bm.allocate(0, [1] * 5)  # 2 blocks
    assert bm.can_allocate(4) and bm.can_allocate([7] * 4)
    assert not bm.can_allocate(5) and not bm.can_allocate([7] * 5)
    before = snapshot(bm)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(1, [7] * 5)
    assert snapshot(bm) == before and 1 not in bm.token_ids
    assert issubclass(NoFreeBlocksError, RuntimeError)


def test_can_append_false_when_full_and_append_changes_nothing():
    bm = TrackedBlockManager(num_blocks=2, block_size=2)
    bm.allocate(0, [1, 2, 3])  # blocks 0, 1; one free slot left in block 1
    assert bm.can_append(0)
    bm.append_slot(0, 4)
    assert not bm.can_append(0)
    before = snapshot(bm)
    with pytest.raises(NoFreeBlocksError):
        bm.append_slot(0, 5)
    assert snapshot(bm) == before
    bm.free(0)
    assert all_free(bm)


def test_can_append_false_when_copy_on_write_needs_a_block():
    bm = TrackedBlockManager(num_blocks=2, block_size=4)
    bm.allocate(0, [1, 2, 3, 4, 5])
    bm.fork(0, 1)
    assert bm.num_free_blocks == 0 and not bm.can_append(0) and not bm.can_append(1)
    before = snapshot(bm)
    with pytest.raises(NoFreeBlocksError):
        bm.append_slot(1, 6)
    assert snapshot(bm) == before


# ----- ref counts, fork, copy-on-write --------------------------------------------------------------
def test_refcounts_never_go_negative():
    pool = BlockAllocator(2)
    b = pool.allocate()
    pool.decref(b)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.decref(b)
    assert pool.ref_counts[b] == 0 and list(pool.free_ids).count(b) == 1


def test_copy_on_write_copies_only_the_shared_written_block():
    bm = TrackedBlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, [1, 2, 3, 4, 5, 6])  # [0, 1], block 1 half full
    bm.fork(0, 1)
    assert bm.get_block_table(1) == [0, 1] and bm.ref_count(0) == bm.ref_count(1) == 2
    assert bm.num_real_tokens == 6  # shared blocks hold their tokens once
    slot, copies = bm.append_slot(1, 70)  # first writer copies the last block only
    assert copies == [(1, 2)] and slot == 2 * 4 + 2
    assert bm.get_block_table(1) == [0, 2] and bm.ref_count(1) == 1 and bm.ref_count(2) == 1
    assert bm.ref_count(0) == 2  # the untouched full block stays shared
    slot, copies = bm.append_slot(0, 60)  # now the last owner: writes in place
    assert copies == [] and slot == 1 * 4 + 2 and bm.get_block_table(0) == [0, 1]
    assert bm.token_ids[0][-1] == 60 and bm.token_ids[1][-1] == 70
    check(bm)


def test_shared_full_last_block_needs_no_copy():
    bm = TrackedBlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, list(range(8)))  # two full blocks
    bm.fork(0, 1)
    for seq_id in (0, 1):
        slot, copies = bm.append_slot(seq_id, 99)
        assert copies == []
    assert bm.get_block_table(0) == [0, 1, 2] and bm.get_block_table(1) == [0, 1, 3]
    assert bm.ref_count(0) == bm.ref_count(1) == 2
    check(bm)


def test_three_way_fork_copies_twice():
    bm = TrackedBlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, [1, 2])
    bm.fork(0, 1)
    bm.fork(1, 2)
    assert bm.ref_count(0) == 3
    copies = [bm.append_slot(s, 5)[1] for s in (2, 0, 1)]
    assert copies == [[(0, 1)], [(0, 2)], []]  # the last of the three owners writes in place
    check(bm)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2), (1, 2, 0), (0, 2, 1), (2, 0, 1)])
def test_fork_and_free_in_any_order_releases_every_block_once(order):
    bm = TrackedBlockManager(num_blocks=12, block_size=4)
    bm.allocate(0, list(range(6)))
    bm.append_slot(0, 6)
    bm.fork(0, 1)
    bm.append_slot(1, 7)  # CoW
    bm.fork(1, 2)  # grandchild shares the child's copy
    for _ in range(3):
        bm.append_slot(2, 8)
    for i, seq_id in enumerate(order):
        bm.free(seq_id)
        check(bm)
        assert (bm.num_used_blocks == 0) == (i == 2)
    assert all_free(bm)


# ----- prefix caching ---------------------------------------------------------------------------------
def cached_bm(num_blocks: int = 8) -> BlockManager:
    return TrackedBlockManager(num_blocks=num_blocks, block_size=4, enable_prefix_caching=True)


A = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # two full blocks and a partial one


def test_prefix_hit_shares_blocks_across_requests():
    bm = cached_bm()
    assert bm.allocate(0, A) == 0
    assert (bm.prefix_hits, bm.prefix_misses, bm.hit_rate) == (0, 2, 0.0)
    assert bm.allocate(1, A[:8] + [50, 51, 52]) == 8
    assert bm.get_block_table(0) == [0, 1, 2] and bm.get_block_table(1) == [0, 1, 3]
    assert bm.ref_count(0) == bm.ref_count(1) == 2
    assert (bm.prefix_hits, bm.prefix_misses, bm.hit_rate) == (2, 2, 0.5)
    assert bm.allocate(2, A[:4] + [0] * 5) == 4  # shares the first block only
    assert (bm.prefix_hits, bm.prefix_misses) == (3, 3)
    assert bm.append_slot(1, 53) == (15, [])  # appends go to the sequence's own last block
    check(bm)


def test_prefix_caching_off_never_hits():
    bm = TrackedBlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, A)
    assert bm.allocate(1, A) == 0 and bm.get_block_table(1) == [3, 4, 5]
    assert (bm.prefix_hits, bm.prefix_misses, bm.hit_rate) == (0, 0, 0.0)
    assert bm.gpu.hash_to_block == {}


def test_prefix_hit_on_evictable_blocks_after_the_first_sequence_finishes():
    bm = cached_bm()
    bm.allocate(0, A)
    bm.free(0)
    assert bm.num_free_blocks == 8 and list(bm.gpu.evictable) == [1, 0]  # tail released first
    assert list(bm.gpu.free_ids) == [3, 4, 5, 6, 7, 2]  # the partial block was never hashed
    assert bm.allocate(1, A) == 8
    assert bm.get_block_table(1) == [0, 1, 3]
    assert bm.ref_count(0) == 1 and not bm.gpu.evictable and bm.num_free_blocks == 5
    check(bm)


def test_evicted_prefix_misses_and_lru_order():
    bm = cached_bm(num_blocks=4)
    bm.allocate(0, A)  # blocks 0, 1 cached, 2 partial
    bm.free(0)  # evictable in LRU order: 1, 0
    bm.allocate(1, [90, 91, 92])  # takes the free block 3, evicts nothing
    assert bm.allocate(2, [80, 81]) == 0  # free list holds only 2 now
    assert bm.get_block_table(2) == [2] and list(bm.gpu.evictable) == [1, 0]
    bm.allocate(3, [70])  # no free block left: evict the least recently freed, block 1
    assert bm.get_block_table(3) == [1] and list(bm.gpu.evictable) == [0]
    assert bm.gpu.lookup((None, tuple(A[:4]))) == 0  # the head survives
    for seq_id in (1, 2, 3):
        bm.free(seq_id)
    assert bm.allocate(4, A) == 4  # first block still cached, second was evicted
    assert bm.get_block_table(4)[0] == 0
    bm.free(4)
    assert bm.allocate(5, A) == 8  # ... and cached again by request 4's prefill
    check(bm)


def test_eviction_needs_room_for_every_block_of_the_prompt():
    bm = cached_bm(num_blocks=3)
    bm.allocate(0, A[:8] + [0])  # 3 blocks, two cached
    bm.free(0)
    assert bm.can_allocate(A[:8] + [0]) and bm.allocate(1, A[:8] + [0]) == 8
    assert not bm.can_allocate([5])
    bm.free(1)
    assert bm.allocate(2, [5] * 12) == 0  # evicts both cached blocks
    assert bm.gpu.hash_to_block.keys() == {hash(k) for k in bm.gpu.block_key.values()}
    assert all(bm.gpu.lookup(key) is None for key in bm._full_block_keys(A[:8]))
    check(bm)


def test_can_allocate_counts_shared_hits_as_free():
    bm = cached_bm(num_blocks=4)
    bm.allocate(0, A)  # 3 blocks used, 1 free
    assert not bm.can_allocate(len(A))  # by count: assumes no hits
    assert bm.can_allocate(A[:8] + [0])  # 2 shared + 1 new
    assert not bm.can_allocate(A[:4] + [0] * 5)  # 1 shared + 2 new
    before = snapshot(bm)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(1, A[:4] + [0] * 5)
    assert snapshot(bm) == before
    assert bm.allocate(1, A[:8] + [0]) == 8 and bm.num_free_blocks == 0


def test_last_token_is_never_cached():
    bm = cached_bm()
    bm.allocate(0, A[:8])  # exactly two full blocks, both hashed
    assert len(bm.gpu.hash_to_block) == 2
    assert bm.allocate(1, A[:8]) == 4  # the second block holds the last token: recomputed
    assert bm.get_block_table(1) == [0, 2] and (bm.prefix_hits, bm.prefix_misses) == (1, 1)
    assert bm.allocate(2, A[:4]) == 0  # one block: nothing may be cached
    assert bm.allocate(3, A[:9]) == 8  # one token more: both blocks hit
    assert (bm.prefix_hits, bm.prefix_misses) == (3, 1)
    check(bm)


def test_hash_chains_through_the_parent_block():
    bm = cached_bm(num_blocks=12)
    bm.allocate(0, [1, 1, 1, 1, 5, 6, 7, 8, 0])
    assert bm.allocate(1, [2, 2, 2, 2, 5, 6, 7, 8, 0]) == 0  # same second block, other parent
    assert bm.allocate(2, [5, 6, 7, 8, 0]) == 0  # same block as a first block
    assert bm.allocate(3, [1, 1, 1, 1, 5, 6, 7, 8, 1]) == 8
    keys = bm._full_block_keys([1, 1, 1, 1, 5, 6, 7, 8])
    assert keys[1] == (hash(keys[0]), (5, 6, 7, 8)) and keys[0][0] is None
    check(bm)


def test_hash_collision_is_verified_by_tokens():
    bm = cached_bm()
    bm.allocate(0, [1, 2, 3, 4, 5])
    key = bm.gpu.block_key[0]
    bm.gpu.block_key[0] = (None, (9, 9, 9, 9))  # pretend another block's tokens share this hash
    assert bm.gpu.lookup(key) is None


def test_decoded_block_is_cached_when_it_fills():
    bm = cached_bm()
    bm.allocate(0, [1, 2, 3])
    assert bm.gpu.hash_to_block == {}  # a partial block is never hashed
    bm.append_slot(0, 4)
    assert bm.gpu.lookup((None, (1, 2, 3, 4))) == 0
    assert bm.allocate(1, [1, 2, 3, 4, 5]) == 4 and bm.ref_count(0) == 2


def test_copy_on_write_target_is_hashed_only_when_full():
    bm = cached_bm()
    bm.allocate(0, [1, 2, 3, 4, 5, 6])  # block 0 hashed, block 1 partial
    bm.fork(0, 1)
    _, copies = bm.append_slot(1, 7)
    assert copies == [(1, 2)] and 2 not in bm.gpu.block_key and 1 not in bm.gpu.block_key
    bm.append_slot(1, 8)  # block 2 full now
    assert bm.gpu.block_key[2] == (hash((None, (1, 2, 3, 4))), (5, 6, 7, 8))
    for token in (7, 8):  # the same tokens fill block 1: the hash is taken, so 1 stays unhashed
        bm.append_slot(0, token)
    assert 1 not in bm.gpu.block_key
    bm.free(0)
    assert 1 in bm.gpu.free_ids  # an unhashed block goes to the free list, not the LRU
    bm.free(1)
    assert list(bm.gpu.evictable) == [2, 0]
    check(bm)


# ----- swapping -------------------------------------------------------------------------------------------
def test_swap_out_and_in_round_trip():
    bm = TrackedBlockManager(num_blocks=6, block_size=4, num_cpu_blocks=3)
    bm.allocate(0, [1] * 5)
    bm.allocate(1, [2] * 3)  # blocks 0, 1 | 2
    assert bm.can_swap_out(0)
    assert bm.swap_out(0) == [(0, 0), (1, 1)]
    assert bm.is_swapped(0) and 0 not in bm.block_tables and bm.cpu_tables[0] == [0, 1]
    assert (bm.num_free_blocks, bm.num_free_cpu_blocks, bm.num_used_blocks) == (5, 1, 1)
    assert bm.num_real_tokens == 3  # swapped-out tokens are not held on the GPU
    assert bm.can_swap_in(0)
    assert bm.swap_in(0) == [(0, 3), (1, 4)]
    assert bm.get_block_table(0) == [3, 4] and bm.num_tokens(0) == 5 and not bm.is_swapped(0)
    assert (bm.num_free_blocks, bm.num_free_cpu_blocks) == (3, 3)
    assert bm.append_slot(0, 1) == (4 * 4 + 1, [])
    bm.free(0)
    bm.free(1)
    assert all_free(bm)


def test_swap_refuses_without_room_and_changes_nothing():
    bm = TrackedBlockManager(num_blocks=3, block_size=4, num_cpu_blocks=1)
    bm.allocate(0, [1] * 5)
    assert not bm.can_swap_out(0)
    before = snapshot(bm)
    with pytest.raises(NoFreeBlocksError):
        bm.swap_out(0)
    assert snapshot(bm) == before
    assert TrackedBlockManager(3, block_size=4).can_swap_out([])  # an empty group always fits
    bm2 = TrackedBlockManager(num_blocks=2, block_size=4, num_cpu_blocks=2)
    bm2.allocate(0, [1] * 5)
    bm2.swap_out(0)
    bm2.allocate(1, [1] * 5)
    assert not bm2.can_swap_in(0)
    before = snapshot(bm2)
    with pytest.raises(NoFreeBlocksError):
        bm2.swap_in(0)
    assert snapshot(bm2) == before
    with pytest.raises(KeyError):
        bm2.append_slot(0, 1)  # a swapped-out sequence is not resident


def test_swapping_a_forked_group_copies_shared_blocks_once():
    bm = TrackedBlockManager(num_blocks=8, block_size=4, num_cpu_blocks=8)
    bm.allocate(0, [1] * 6)
    bm.fork(0, 1)
    bm.append_slot(1, 2)  # CoW: 0 -> [0, 1], 1 -> [0, 2]
    assert bm.can_swap_out([0, 1])
    assert bm.swap_out([0, 1]) == [(0, 0), (1, 1), (2, 2)]
    assert bm.cpu_tables == {0: [0, 1], 1: [0, 2]} and bm.cpu.ref_counts[0] == 2
    assert bm.num_free_blocks == 8
    assert bm.swap_in([1, 0]) == [(0, 3), (2, 4), (1, 5)]
    assert bm.get_block_table(0) == [3, 5] and bm.get_block_table(1) == [3, 4] and bm.ref_count(3) == 2
    assert bm.num_free_cpu_blocks == 8
    with pytest.raises(ValueError, match="twice"):
        bm.swap_out([0, 0])
    check(bm)


def test_swapping_one_of_two_sharers_gives_it_its_own_copy():
    bm = TrackedBlockManager(num_blocks=4, block_size=4, num_cpu_blocks=4)
    bm.allocate(0, [1] * 3)
    bm.fork(0, 1)
    assert bm.swap_out(1) == [(0, 0)]
    assert bm.ref_count(0) == 1 and bm.get_block_table(0) == [0]  # the sibling keeps block 0
    assert bm.append_slot(0, 5) == (3, [])  # now the only owner: in place
    assert bm.swap_in(1) == [(0, 1)]
    assert bm.get_block_table(1) == [1] and bm.token_ids[1] == [1, 1, 1]
    bm.free(0)
    bm.swap_out(1)
    bm.free(1)  # a swapped-out sequence releases its CPU blocks
    assert all_free(bm)


# ----- randomized stress ----------------------------------------------------------------------------------
class Runner:
    """What a model runner would hold in the cache: token per GPU / CPU slot, updated from the
    copies the manager returns and the slots it hands out."""

    def __init__(self, bm: BlockManager):
        self.bm, self.gpu, self.cpu = bm, {}, {}

    def copy(self, pairs, src: dict, dst: dict) -> None:
        bs = self.bm.block_size
        for s, d in pairs:
            for i in range(bs):
                dst[d * bs + i] = src.get(s * bs + i)

    def check(self) -> None:
        bm = self.bm
        for seq_id, tokens in bm.token_ids.items():
            store, table = (self.cpu, bm.cpu_tables[seq_id]) if bm.is_swapped(seq_id) else \
                           (self.gpu, bm.block_tables[seq_id])
            held = [store.get(table[p // bm.block_size] * bm.block_size + p % bm.block_size)
                    for p in range(len(tokens))]
            assert held == tokens, f"sequence {seq_id} reads {held}, expected {tokens}"


@pytest.mark.parametrize("caching", [False, True])
def test_random_ops_keep_invariants_and_contents(caching):
    rng = random.Random(1234 + caching)
    bm = TrackedBlockManager(num_blocks=24, block_size=4, num_cpu_blocks=12, enable_prefix_caching=caching)
    runner, next_id, stats = Runner(bm), 0, Counter()
    prefixes = [[rng.randrange(3) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    for _ in range(3000):
        resident, swapped = list(bm.block_tables), list(bm.cpu_tables)
        cached_before = set(bm.gpu.hash_to_block.items())
        op = rng.choice(["allocate", "allocate", "append", "append", "append", "append", "fork", "free",
                         "swap_out", "swap_in"])
        if op == "allocate":
            prompt = rng.choice(prefixes) + [rng.randrange(3) for _ in range(rng.randrange(0, 6))]
            if not bm.can_allocate(prompt):
                before = snapshot(bm)
                with pytest.raises(NoFreeBlocksError):
                    bm.allocate(next_id, prompt)
                assert snapshot(bm) == before
                stats["exhausted"] += 1
                continue
            evictable = set(bm.gpu.evictable)
            cached = bm.allocate(next_id, prompt)
            stats["revived"] += len(evictable & set(bm.get_block_table(next_id)))
            assert cached % bm.block_size == 0 and cached < len(prompt)
            for p in range(len(prompt)):  # prefill writes the tokens that were not cached
                if p >= cached:
                    runner.gpu[bm.get_slot(next_id, p)] = prompt[p]
            stats["hit_tokens"] += cached
            next_id += 1
        elif op == "append" and resident:
            seq_id = rng.choice(resident)
            if not bm.can_append(seq_id):
                stats["append_refused"] += 1
                continue
            token = rng.randrange(3)
            slot, copies = bm.append_slot(seq_id, token)
            runner.copy(copies, runner.gpu, runner.gpu)
            runner.gpu[slot] = token
            stats["cow"] += len(copies)
        elif op == "fork" and resident:
            bm.fork(rng.choice(resident), next_id)
            next_id += 1
        elif op == "free" and (resident or swapped):
            bm.free(rng.choice(resident + swapped))
        elif op == "swap_out" and resident:
            group = rng.sample(resident, min(len(resident), rng.randrange(1, 3)))
            if bm.can_swap_out(group):
                runner.copy(bm.swap_out(group), runner.gpu, runner.cpu)
                stats["swap_out"] += 1
        elif op == "swap_in" and swapped:
            group = rng.sample(swapped, min(len(swapped), rng.randrange(1, 3)))
            if bm.can_swap_in(group):
                runner.copy(bm.swap_in(group), runner.cpu, runner.gpu)
                stats["swap_in"] += 1
        check(bm)
        runner.check()
        stats["evicted"] += len(cached_before - set(bm.gpu.hash_to_block.items()))  # only eviction drops a hash
        assert bm.num_real_tokens <= bm.num_used_blocks * bm.block_size
    # the run exercised what it claims to
    assert min(stats["exhausted"], stats["append_refused"], stats["cow"], stats["swap_out"],
               stats["swap_in"]) > 0, stats
    assert (stats["hit_tokens"] > 0) == caching and (bm.prefix_hits > 0) == caching
    assert (min(stats["revived"], stats["evicted"]) > 0) == caching, stats
    for seq_id in list(bm.token_ids):
        bm.free(seq_id)
    assert all_free(bm)
