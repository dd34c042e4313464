"""Iteration-level scheduler (Orca's idea, vLLM's block manager): host-side, JAX-free, returning each
step's plan as plain data.

Every step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running sequences go first, oldest first: each gets its uncomputed tokens (one for a decode) while
the budget lasts. If the block manager has no slot for a running sequence's next token, the newest
running sequence is preempted: by recompute (blocks freed, back to the front of the queue, tokens
kept to be prefilled again) or by swap (blocks copied to the CPU pool, brought back later with their
K/V; recompute when the CPU pool is full). Swapped sequences come back, oldest first, before any new
admission and only in a step that preempted nothing. Then waiting sequences are admitted
first-come first-served while the budget, the sequence cap and the free blocks allow.

    chunked_prefill=False  a prompt is admitted only if all of it fits this step's budget
                           (vLLM's default before V1: the `continuous` policy)
    chunked_prefill=True   a prompt may be split over steps, decode tokens and prefill chunks share
                           one budget (Sarathi / DeepSpeed-FastGen Dynamic SplitFuse / vLLM V1)
    admit_when_idle=True   new sequences join only when none is running (static batching:
                           FasterTransformer); the batch's prompts then go in one step, whatever
                           the budget
    reserve=fn             the manager reserves `fn(seq)` tokens per sequence at admission
                           (`reservation.ReservationManager`: Orca); not consulted by static
                           batching on that manager (below)

Static batching on contiguous memory (admit_when_idle=True with a `ReservationManager`: the engine's
`static` policy) reserves per batch, as FasterTransformer sizes its KV cache per `forward` call
(`reservation.py`): a batch of n members holds n rows of longest prompt + largest max_tokens tokens,
each row rounded up to whole blocks, i.e. n * ceil((max prompt + max max_tokens) / block_size)
blocks. The batch forms when nothing is running, first-come first-served from the head of the
queue: the next waiting sequence joins if the batch would then have at most `max_num_seqs` members
and the grown batch's reservation (recomputed with the joiner's prompt and max_tokens, so every
row grows when a longer member joins) fits in one free extent of the pool. The first sequence that
does not fit ends the batch; no later, smaller one is taken past it, and it heads the next batch.
The batch's blocks are reserved at once and return to the pool only when its last member finishes
or is aborted; members that finish earlier keep their rows. No member can outgrow its row, so
static batching never preempts. On a paged `BlockManager`, static batching keeps per-token blocks
freed per sequence (the scheduler's paged rules, admission only when idle).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

from continuous_batching.request import Sequence, Status
from continuous_batching.reservation import ReservationManager, batch_row_tokens
from paged_attention.block_manager import BlockManager

PREEMPTION_MODES = ("recompute", "swap")


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's part of a step, as planned (the sequence itself also carries `num_new_tokens`
    and its `block_table` for the step being run; this record keeps the plan after it ran)."""

    seq_id: int
    num_new_tokens: int  # the sequence's tokens [num_computed, num_computed + num_new_tokens)
    samples: bool  # True when the chunk reaches the end of its tokens: the step samples a token
    seq: Sequence | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Schedule:
    seqs: list[ScheduledSeq]
    preempted: list[int]  # seq ids preempted this step (recompute or swap)
    block_copies: list[tuple[int, int]]  # copy-on-write (src, dst) to run before the step
    swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (gpu, cpu) blocks
    swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (cpu, gpu) blocks

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, manager: BlockManager | ReservationManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 chunked_prefill: bool = False, preemption: str = "recompute", admit_when_idle: bool = False,
                 reserve: Callable[[Sequence], int] | None = None):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if preemption not in PREEMPTION_MODES:
            raise ValueError(f"preemption must be one of {PREEMPTION_MODES}, got {preemption!r}")
        self.manager, self.chunked_prefill, self.preemption = manager, chunked_prefill, preemption
        self.admit_when_idle, self.reserve = admit_when_idle, reserve
        self.reserve_per_batch = admit_when_idle and isinstance(manager, ReservationManager)
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.swapped: list[Sequence] = []  # oldest first
        self.running: list[Sequence] = []  # admission order: oldest first
        self.num_preemptions = 0
        self.admitted_tokens = 0  # tokens of sequences at their admission (prompt, or prompt + output on recompute)
        self.cached_tokens = 0  # of those, found in the prefix cache (not computed)

    def add(self, seq: Sequence) -> None:
        if not (self.chunked_prefill or self.admit_when_idle) and seq.num_tokens > self.budget:
            raise ValueError(f"a prompt of {seq.num_tokens} tokens can never fit max_num_batched_tokens="
                             f"{self.budget} without chunked prefill")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def abort(self, seq_id: int) -> Sequence | None:
        """Drop a sequence wherever it is, freeing its blocks; returns it (None if unknown)."""
        for queue in (self.waiting, self.swapped, self.running):
            for seq in queue:
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    if seq.status in (Status.RUNNING, Status.SWAPPED):
                        self.manager.free(seq_id)
                    seq.status = Status.FINISHED_ABORTED
                    return seq
        return None

    def schedule(self) -> Schedule:
        """Plan one step (see the module docstring)."""
        plan = Schedule([], [], [])
        budget = self.budget
        for seq in list(self.running):
            if seq in self.running and budget > 0 and self._make_room(seq, plan):
                plan.seqs.append(self._plan(seq, budget))
                budget -= plan.seqs[-1].num_new_tokens
        while self.swapped and not plan.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.swapped[0]
            table_len = len(self.manager.cpu_tables[seq.seq_id])
            if not self.manager.can_swap_in(seq.seq_id) or self.manager.num_free_blocks <= table_len:
                break  # keep one block spare for its next token
            self.swapped.pop(0)
            plan.swap_in.extend(self.manager.swap_in(seq.seq_id))
            seq.status = Status.RUNNING
            self.running.append(seq)
            if self._make_room(seq, plan):
                plan.seqs.append(self._plan(seq, budget))
                budget -= plan.seqs[-1].num_new_tokens
        if self.swapped or (self.admit_when_idle and self.running):
            return plan
        if self.reserve_per_batch:
            self._admit_batch(plan)
            return plan
        while self.waiting and len(self.running) < self.max_num_seqs and (budget > 0 or self.admit_when_idle):
            seq = self.waiting[0]
            if not (self.chunked_prefill or self.admit_when_idle) and seq.num_uncomputed > budget:
                break
            if not self._can_allocate(seq):
                break
            self.waiting.popleft()
            seq.num_computed = self._allocate(seq)
            self.admitted_tokens += seq.num_tokens
            self.cached_tokens += seq.num_computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.seqs.append(self._plan(seq, budget))
            budget -= plan.seqs[-1].num_new_tokens
        return plan

    def _admit_batch(self, plan: Schedule) -> None:
        """Form a static batch on contiguous memory and reserve it whole (see the module docstring)."""
        batch: list[Sequence] = []
        for seq in self.waiting:
            if len(self.running) + len(batch) >= self.max_num_seqs:
                break
            grown = batch + [seq]
            if not self.manager.can_allocate_batch([s.tokens for s in grown], self.batch_row_tokens(grown)):
                break
            batch = grown
        if not batch:
            return
        self.manager.allocate_batch([s.seq_id for s in batch], [s.tokens for s in batch],
                                    self.batch_row_tokens(batch))
        for seq in batch:
            self.waiting.popleft()
            seq.num_computed, seq.status = 0, Status.RUNNING
            self.admitted_tokens += seq.num_tokens
            self.running.append(seq)
            plan.seqs.append(self._plan(seq, self.budget))

    @staticmethod
    def batch_row_tokens(batch: list[Sequence]) -> int:
        """Tokens of each row of a static batch: longest prompt + largest max_tokens."""
        return batch_row_tokens([len(s.prompt) for s in batch], [s.max_tokens for s in batch])

    def _can_allocate(self, seq: Sequence) -> bool:
        if self.reserve is None:
            return self.manager.can_allocate(seq.tokens)
        return self.manager.can_allocate(seq.tokens, reserve=self.reserve(seq))

    def _allocate(self, seq: Sequence) -> int:
        if self.reserve is None:
            return self.manager.allocate(seq.seq_id, seq.tokens)
        return self.manager.allocate(seq.seq_id, seq.tokens, reserve=self.reserve(seq))

    def _make_room(self, seq: Sequence, plan: Schedule) -> bool:
        """Give a decoding sequence a slot for its last sampled token, preempting the newest running
        sequences while there is none. False if `seq` itself was preempted."""
        if self.manager.num_tokens(seq.seq_id) == seq.num_tokens:
            return True  # still prefilling: its blocks were allocated with its tokens
        while not self.manager.can_append(seq.seq_id):
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        _, cow = self.manager.append_slot(seq.seq_id, seq.tokens)
        plan.block_copies.extend(cow)
        return True

    def _plan(self, seq: Sequence, budget: int) -> ScheduledSeq:
        """Give the sequence its tokens for this step (its uncomputed ones, as the budget allows)
        and its current block table."""
        n = seq.num_uncomputed if self.admit_when_idle else min(seq.num_uncomputed, budget)
        seq.num_new_tokens, seq.block_table = n, self.manager.get_block_table(seq.seq_id)
        return ScheduledSeq(seq.seq_id, n, seq.num_computed + n == seq.num_tokens, seq)

    def _preempt(self, seq: Sequence, plan: Schedule) -> None:
        """Swap the sequence out if asked and the CPU pool has room, else recompute: free its
        blocks, requeue it at the front, keep its tokens."""
        self.running.remove(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        plan.preempted.append(seq.seq_id)
        if self.preemption == "swap" and self.manager.can_swap_out(seq.seq_id):
            plan.swap_out.extend(self.manager.swap_out(seq.seq_id))
            seq.status = Status.SWAPPED
            self.swapped.append(seq)
            self.swapped.sort(key=lambda s: (s.arrival_s, s.seq_id))
            return
        self.manager.free(seq.seq_id)
        seq.status, seq.num_computed = Status.WAITING, 0
        self.waiting.appendleft(seq)

    def update(self, schedule: Schedule, sampled: dict[int, int]) -> list[Sequence]:
        """After the model step: advance computed counts, record sampled tokens, free finished
        sequences. `sampled` maps seq id -> token for every scheduled seq with `samples`. Returns
        the sequences that finished."""
        finished = []
        for planned in schedule.seqs:
            seq = planned.seq
            seq.advance(sampled[planned.seq_id] if planned.samples else None)
            if seq.status.finished:
                self.finish(seq)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence) -> None:
        """Release a running sequence that finished (its status already says why)."""
        self.running.remove(seq)
        self.manager.free(seq.seq_id)
