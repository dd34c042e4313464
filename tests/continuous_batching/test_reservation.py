"""Orca-style contiguous reservations: rule sizes, first-fit regions, fragmentation, merging."""

from __future__ import annotations

import pytest

from continuous_batching.request import Sequence
from continuous_batching.reservation import ReservationManager, reservation_tokens
from continuous_batching.scheduler import ScheduledSeq, Scheduler
from paged_attention.block_manager import NoFreeBlocksError


def test_rules():
    assert reservation_tokens("max", 10, 20, 512) == 512
    assert reservation_tokens("pow2", 10, 20, 512) == 32
    assert reservation_tokens("pow2", 300, 300, 512) == 512  # capped
    assert reservation_tokens("oracle", 10, 20, 512) == 30
    with pytest.raises(ValueError, match="reservation must be one of"):
        reservation_tokens("min", 1, 1, 8)


def test_regions_are_contiguous_and_free_merges_neighbours():
    manager = ReservationManager(10, block_size=4)
    manager.allocate(0, [1] * 5, reserve=12)  # blocks 0-2
    manager.allocate(1, [1] * 2, reserve=8)  # blocks 3-4
    manager.allocate(2, [1] * 3, reserve=8)  # blocks 5-6
    assert manager.get_block_table(0) == [0, 1] and manager.get_block_table(2) == [5]
    assert manager.append_slot(0, 7) == (5, [])  # token 6 of a region starting at block 0
    manager.free(1)
    assert manager.free_extents == [(3, 2), (7, 3)]
    assert not manager.can_allocate([1], reserve=20)  # 5 blocks free, but no 5 in a row
    with pytest.raises(NoFreeBlocksError, match="no 5 contiguous"):
        manager.allocate(3, [1], reserve=20)
    manager.free(2)
    assert manager.free_extents == [(3, 7)] and manager.can_allocate([1], reserve=20)


def test_a_sequence_cannot_outgrow_its_region():
    manager = ReservationManager(4, block_size=2)
    manager.allocate(0, [1, 2, 3], reserve=4)
    manager.append_slot(0, 4)
    assert not manager.can_append(0)
    with pytest.raises(NoFreeBlocksError, match="outgrew"):
        manager.append_slot(0, 5)


def test_request_level_admission_follows_the_reservations():
    """8 blocks of 2 tokens; oracle reservations of prompt + max_tokens: 3 + 3 -> 3 blocks each, so
    two sequences fit (6 blocks) and the third waits for the first to finish."""
    manager = ReservationManager(8, block_size=2)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=32,
                          reserve=lambda seq: reservation_tokens("oracle", len(seq.prompt), seq.max_tokens, 64))
    group = [Sequence(i, [i + 1] * 3, 3) for i in range(3)]
    for seq in group:
        scheduler.add(seq)
    log = []
    while scheduler.has_work():
        schedule = scheduler.schedule()
        log.append(schedule)
        scheduler.update(schedule, {p.seq_id: 9 for p in schedule.seqs if p.samples})
    assert log[0].seqs == [ScheduledSeq(0, 3, True), ScheduledSeq(1, 3, True)]
    assert log[3].seqs[-1] == ScheduledSeq(2, 3, True)  # after seqs 0 and 1 took their 3 tokens
    assert manager.free_extents == [(0, 8)]
