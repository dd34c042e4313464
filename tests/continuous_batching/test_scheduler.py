"""The iteration-level scheduler with a mock model of hand-checkable arithmetic (JetStream style):
exact schedules for small scenarios, preemption and resumption, no token lost."""

from __future__ import annotations

import pytest

from continuous_batching.request import Sequence, Status
from continuous_batching.scheduler import ScheduledSeq, Scheduler
from paged_attention.block_manager import BlockManager


def mock_next_token(tokens: list[int]) -> int:
    """Depends on every token of the sequence, so a lost or repeated token changes the output."""
    return (7 * sum(tokens) + len(tokens)) % 97


def run(scheduler: Scheduler, seqs: list[Sequence], max_steps: int = 200):
    for seq in seqs:
        scheduler.add(seq)
    by_id, log = {s.seq_id: s for s in seqs}, []
    while scheduler.has_work():
        assert len(log) < max_steps, "scheduler made no progress"
        schedule = scheduler.schedule()
        assert schedule.num_tokens <= scheduler.budget or scheduler.admit_when_idle
        assert len(schedule.seqs) <= scheduler.max_num_seqs
        log.append(schedule)
        sampled = {p.seq_id: mock_next_token(by_id[p.seq_id].tokens) for p in schedule.seqs if p.samples}
        scheduler.update(schedule, sampled)
    return log


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(mock_next_token(tokens))
    return tokens[len(prompt):]


def seqs(*prompt_lens: int, max_tokens: int = 3) -> list[Sequence]:
    return [Sequence(i, list(range(10 * i + 1, 10 * i + 1 + n)), max_tokens) for i, n in enumerate(prompt_lens)]


def test_continuous_admits_whole_prompts_then_decodes():
    scheduler = Scheduler(BlockManager(32, 4), max_num_seqs=4, max_num_batched_tokens=8)
    log = run(scheduler, seqs(6, 5))
    assert log[0].seqs == [ScheduledSeq(0, 6, True)]  # 5 more tokens would exceed the budget of 8
    assert log[1].seqs == [ScheduledSeq(0, 1, True), ScheduledSeq(1, 5, True)]
    assert log[2].seqs == [ScheduledSeq(0, 1, True), ScheduledSeq(1, 1, True)]
    assert log[3].seqs == [ScheduledSeq(1, 1, True)]  # seq 0 finished after 3 tokens
    assert len(log) == 4


def test_chunked_prefill_splits_a_prompt_and_mixes_it_with_decodes():
    scheduler = Scheduler(BlockManager(32, 4), max_num_seqs=4, max_num_batched_tokens=8, chunked_prefill=True)
    log = run(scheduler, seqs(6, 5))
    assert log[0].seqs == [ScheduledSeq(0, 6, True), ScheduledSeq(1, 2, False)]
    assert log[1].seqs == [ScheduledSeq(0, 1, True), ScheduledSeq(1, 3, True)]
    assert log[2].seqs == [ScheduledSeq(0, 1, True), ScheduledSeq(1, 1, True)]


@pytest.mark.parametrize("chunked", [False, True])
def test_outputs_are_exact_whatever_the_schedule(chunked):
    group = seqs(3, 9, 1, 6, 4, max_tokens=5)
    run(Scheduler(BlockManager(64, 4), max_num_seqs=3, max_num_batched_tokens=10, chunked_prefill=chunked), group)
    for seq in group:
        assert seq.status is Status.FINISHED_LENGTH
        assert seq.output == expected_output(seq.prompt, 5)


def test_recompute_preemption_newest_first_and_resumption():
    """Block size 2, 4 blocks: two 3-token prompts take all of them; the third token of output needs
    a new block each, so the newest sequence is preempted and resumes later, outputs unchanged."""
    manager = BlockManager(4, 2)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=16)
    group = seqs(3, 3, max_tokens=4)
    log = run(scheduler, group)
    assert log[0].seqs == [ScheduledSeq(0, 3, True), ScheduledSeq(1, 3, True)]
    assert log[1].seqs == [ScheduledSeq(0, 1, True), ScheduledSeq(1, 1, True)]  # 4th token fits block 2
    assert log[2].preempted == [1] and log[2].seqs == [ScheduledSeq(0, 1, True)]
    assert group[1].num_preemptions == 1 and group[0].num_preemptions == 0
    resumed = next(s for s in log if any(p.seq_id == 1 for p in s.seqs) and s is not log[0] and s is not log[1])
    assert resumed.seqs[-1] == ScheduledSeq(1, 5, True)  # prompt 3 + 2 outputs, recomputed at once
    for seq in group:
        assert seq.output == expected_output(seq.prompt, 4)
    assert manager.num_free_blocks == 4


def test_a_prompt_that_never_fits_is_refused_at_add():
    scheduler = Scheduler(BlockManager(32, 4), max_num_seqs=2, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="can never fit max_num_batched_tokens=4"):
        scheduler.add(Sequence(0, [1] * 5, 2))


def test_stop_token_finishes_early():
    group = [Sequence(0, [1, 2, 3], 10, stop_token_ids=frozenset({expected_output([1, 2, 3], 3)[1]}))]
    run(Scheduler(BlockManager(8, 4), max_num_seqs=1, max_num_batched_tokens=8), group)
    assert group[0].status is Status.FINISHED_STOPPED and len(group[0].output) == 2


def test_swap_preemption_keeps_the_cache_and_resumes_with_a_decode():
    """The recompute scenario above, with a CPU pool: the newest sequence's 2 blocks go to the CPU and
    come back when sequence 0 finishes; it resumes with one token, not a 5-token recompute."""
    manager = BlockManager(4, 2, num_cpu_blocks=4)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=16, preemption="swap")
    group = seqs(3, 3, max_tokens=4)
    log = run(scheduler, group)
    assert log[2].preempted == [1] and len(log[2].swap_out) == 2 and log[2].seqs == [ScheduledSeq(0, 1, True)]
    back = next(i for i, s in enumerate(log) if s.swap_in)
    assert log[back].seqs == [ScheduledSeq(1, 1, True)] and len(log[back].swap_in) == 2
    assert group[0].status.finished  # swap-in waited for the blocks sequence 0 freed
    for seq in group:
        assert seq.output == expected_output(seq.prompt, 4)
    assert manager.num_free_blocks == 4 and manager.num_free_cpu_blocks == 4


def test_swap_falls_back_to_recompute_when_the_cpu_pool_is_full():
    manager = BlockManager(4, 2, num_cpu_blocks=1)  # seq 1 holds 2 blocks: no room
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=16, preemption="swap")
    group = seqs(3, 3, max_tokens=4)
    log = run(scheduler, group)
    assert log[2].preempted == [1] and not log[2].swap_out
    assert [seq.output for seq in group] == [expected_output(seq.prompt, 4) for seq in group]


def test_static_batching_admits_only_when_the_batch_is_done():
    scheduler = Scheduler(BlockManager(32, 4), max_num_seqs=2, max_num_batched_tokens=4, admit_when_idle=True)
    group = seqs(3, 5, 2, max_tokens=2)
    group[1].max_tokens = 4
    log = run(scheduler, group)
    assert log[0].seqs == [ScheduledSeq(0, 3, True), ScheduledSeq(1, 5, True)]  # budget 4 ignored
    assert [len(s.seqs) for s in log] == [2, 2, 1, 1, 1, 1]  # seq 2 waits for seq 1's last token
    assert log[4].seqs == [ScheduledSeq(2, 2, True)]


def test_abort_frees_a_running_sequence():
    manager = BlockManager(8, 4)
    scheduler = Scheduler(manager, max_num_seqs=2, max_num_batched_tokens=16)
    group = seqs(5, 2, max_tokens=10)
    for seq in group:
        scheduler.add(seq)
    schedule = scheduler.schedule()
    scheduler.update(schedule, {p.seq_id: 1 for p in schedule.seqs})
    assert scheduler.abort(0) is group[0] and group[0].status is Status.FINISHED_ABORTED
    assert scheduler.abort(0) is None
    assert [s.seq_id for s in scheduler.running] == [1] and manager.num_free_blocks == 7
