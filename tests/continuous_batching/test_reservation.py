"""Orca-style contiguous reservations: rule sizes, first-fit regions, fragmentation, merging."""

from __future__ import annotations

import pytest

from continuous_batching.request import Sequence
from continuous_batching.reservation import ReservationManager, batch_row_tokens, reservation_tokens
from continuous_batching.scheduler import ScheduledSeq, Scheduler
from paged_attention.block_manager import NoFreeBlocksError


def test_rules():
    assert reservation_tokens("max", 10, 20, 512) == 512
    assert reservation_tokens("pow2", 10, 20, 512) == 10 + 32  # outputs rounded up (vLLM paper, 6.1)
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
    assert manager.append_slot(0, [1] * 6) == (5, [])  # token 6 of a region starting at block 0
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
    manager.append_slot(0, [1, 2, 3, 4])
    assert not manager.can_append(0)
    with pytest.raises(NoFreeBlocksError, match="outgrew"):
        manager.append_slot(0, [1, 2, 3, 4, 5])


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


# ----- static batching: FasterTransformer's per-batch reservation ---------------------------------

def static_run(scheduler: Scheduler, group: list[Sequence], on_step=None) -> list:
    """Run to completion, sampling token 9 (never a stop token); `on_step(schedule)` after each
    schedule, before its update (so a step's allocations are in and its finishes not yet freed)."""
    for seq in group:
        scheduler.add(seq)
    log = []
    while scheduler.has_work():
        assert len(log) < 100, "no progress"
        schedule = scheduler.schedule()
        log.append(schedule)
        if on_step is not None:
            on_step(schedule)
        scheduler.update(schedule, {p.seq_id: 9 for p in schedule.seqs if p.samples})
    return log


def static_scheduler(manager: ReservationManager, max_num_seqs: int = 8) -> Scheduler:
    # the engine passes its per-request rule too; static batching on contiguous memory ignores it
    return Scheduler(manager, max_num_seqs=max_num_seqs, max_num_batched_tokens=4, admit_when_idle=True,
                     reserve=lambda seq: 10_000)


def test_batch_row_tokens_is_the_longest_prompt_plus_the_largest_max_tokens():
    assert batch_row_tokens([3, 9, 5], [2, 6, 1]) == 15
    assert batch_row_tokens([9, 2], [1, 60]) == 69  # the two maxima come from different members
    with pytest.raises(ValueError, match="one max_tokens per prompt"):
        batch_row_tokens([3, 4], [1])


def test_allocate_batch_lays_rows_in_one_extent_and_frees_it_with_the_last_member():
    """Block size 4; rows of 15 tokens -> 4 blocks each; three rows = blocks 0-11 of 16."""
    manager = ReservationManager(16, block_size=4)
    assert manager.can_allocate_batch([[1] * 3, [1] * 9, [1] * 5], row_tokens=15)
    assert not manager.can_allocate_batch([[1] * 3] * 5, row_tokens=15)  # 20 blocks > 16
    assert not manager.can_allocate_batch([[1] * 16], row_tokens=15)  # a member longer than its row
    manager.allocate_batch([7, 8, 9], [[1] * 3, [1] * 9, [1] * 5], row_tokens=15)
    assert manager.regions == {7: (0, 4), 8: (4, 4), 9: (8, 4)} and manager.free_extents == [(12, 4)]
    assert [manager.get_block_table(s) for s in (7, 8, 9)] == [[0], [4, 5, 6], [8, 9]]
    assert (manager.num_used_blocks, manager.num_real_tokens) == (12, 17)
    manager.free(8)  # finished early: its tokens are no longer real, its row stays reserved
    assert (manager.num_used_blocks, manager.num_real_tokens) == (12, 8)
    manager.free(7)
    assert (manager.num_used_blocks, manager.num_real_tokens) == (12, 5)
    manager.free(9)  # the last member: the whole extent comes back, merged with the free tail
    assert manager.free_extents == [(0, 16)] and (manager.num_used_blocks, manager.num_real_tokens) == (0, 0)
    assert manager.regions == {} and manager.batches == {} and manager.batch_of == {}
    with pytest.raises(KeyError):
        manager.free(9)


def test_static_batch_reserves_batch_size_times_longest_prompt_plus_largest_max_tokens():
    """Block size 4, prompts 3/9/5 with max_tokens 2/6/1: one batch reserving 3 x (9 + 6) = 45 tokens,
    3 rows of ceil(15 / 4) = 4 blocks = 12 blocks (48 slots), held until the last member finishes."""
    manager = ReservationManager(16, block_size=4)
    group = [Sequence(0, [1] * 3, 2), Sequence(1, [2] * 9, 6), Sequence(2, [3] * 5, 1)]
    used = []
    log = static_run(static_scheduler(manager), group,
                     on_step=lambda _: used.append((manager.num_used_blocks, manager.num_real_tokens)))
    assert log[0].seqs == [ScheduledSeq(0, 3, True), ScheduledSeq(1, 9, True), ScheduledSeq(2, 5, True)]
    assert [len(s.seqs) for s in log] == [3, 2, 1, 1, 1, 1]  # seq 2 ends after 1 token, seq 0 after 2
    # real tokens: the prompts, 3 + 9 + 5 = 17; step 2 places the sampled tokens of seqs 0 and 1
    # (4 + 10: seq 2 is done), step 3 seq 1's alone (11), ...; the 12 blocks stay to the end
    assert used == [(12, 17), (12, 14), (12, 11), (12, 12), (12, 13), (12, 14)]
    assert manager.free_extents == [(0, 16)] and manager.num_real_tokens == 0
    assert [len(s.output) for s in group] == [2, 6, 1]


def test_the_batch_reservation_grows_with_each_member_and_stops_at_the_first_that_does_not_fit():
    """12 blocks of 4 tokens. Seqs 0-2 (prompts 3/9/5, max_tokens 2/6/1) need 3 rows of 4 blocks = 12:
    they fit exactly. Seq 3 (prompt 2, max_tokens 1) is short, but a 4th row of 4 blocks needs 16 > 12:
    it waits for the next batch, where alone it reserves one row of ceil(3 / 4) = 1 block."""
    manager = ReservationManager(12, block_size=4)
    group = [Sequence(0, [1] * 3, 2), Sequence(1, [2] * 9, 6), Sequence(2, [3] * 5, 1), Sequence(3, [4] * 2, 1)]
    used = []
    log = static_run(static_scheduler(manager), group, on_step=lambda _: used.append(manager.num_used_blocks))
    assert [p.seq_id for p in log[0].seqs] == [0, 1, 2]
    assert [len(s.seqs) for s in log] == [3, 2, 1, 1, 1, 1, 1]
    assert log[6].seqs == [ScheduledSeq(3, 2, True)]  # after seq 1's last token
    assert used == [12] * 6 + [1]
    assert manager.free_extents == [(0, 12)]


def test_a_longer_joiner_grows_every_row_and_can_end_the_batch():
    """10 blocks of 4 tokens. Seq 0 (prompt 2, max_tokens 2) alone: 1 row of 1 block. With seq 1
    (prompt 10, max_tokens 1) the rows become 10 + 2 = 12 tokens = 3 blocks: 2 x 3 = 6 <= 10, it joins.
    Seq 2 (prompt 1, max_tokens 8) would make rows 10 + 8 = 18 tokens = 5 blocks: 3 x 5 = 15 > 10, so
    it waits, although under its own prompt + max_tokens (9 tokens, 3 blocks) it would fit beside
    the other two (6 + 3 = 9 blocks). Seq 3 behind it waits too: first come, first served."""
    manager = ReservationManager(10, block_size=4)
    group = [Sequence(0, [1] * 2, 2), Sequence(1, [2] * 10, 1), Sequence(2, [3], 8), Sequence(3, [4], 1)]
    formed = []  # (members, blocks used) at each batch's first step, when no member has computed a token
    static_run(static_scheduler(manager), group, on_step=lambda schedule: formed.extend(
        [([p.seq_id for p in schedule.seqs], manager.num_used_blocks)]
        if all(group[p.seq_id].num_computed == 0 for p in schedule.seqs) else []))
    # the second batch: rows of 1 + 8 = 9 tokens = 3 blocks, 2 rows
    assert formed == [([0, 1], 6), ([2, 3], 6)]
    assert all(seq.output == [9] * seq.max_tokens for seq in group)
    assert manager.free_extents == [(0, 10)]


def test_the_batch_is_capped_by_max_num_seqs():
    manager = ReservationManager(64, block_size=4)
    group = [Sequence(i, [i + 1] * 2, 1) for i in range(5)]
    log = static_run(static_scheduler(manager, max_num_seqs=2), group)
    assert [[p.seq_id for p in s.seqs] for s in log] == [[0, 1], [2, 3], [4]]


def test_aborting_a_member_keeps_the_rows_until_the_batch_ends():
    manager = ReservationManager(16, block_size=4)
    scheduler = static_scheduler(manager)
    group = [Sequence(0, [1] * 3, 4), Sequence(1, [2] * 5, 4)]  # rows of 5 + 4 = 9 tokens: 3 blocks each
    for seq in group:
        scheduler.add(seq)
    schedule = scheduler.schedule()
    scheduler.update(schedule, {p.seq_id: 9 for p in schedule.seqs})
    assert scheduler.abort(1) is group[1] and manager.num_used_blocks == 6 and manager.num_real_tokens == 3
    assert scheduler.abort(0) is group[0] and manager.free_extents == [(0, 16)]
