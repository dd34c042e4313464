"""Iteration-level scheduler over a paged KV cache (Orca's idea, vLLM's block manager): host-side,
JAX-free, returning each step's plan as plain data.

Every step has a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running sequences go first, oldest first: each gets its uncomputed tokens (one for a decode) while
the budget lasts. If the block manager has no slot for a running sequence's next token, the newest
running sequence is preempted by recompute (its blocks freed, back to the front of the queue, its
tokens kept to be prefilled again). Then waiting sequences are admitted first-come first-served
while the budget, the sequence cap and the free blocks allow.

    chunked_prefill=False  a prompt is admitted only if all of it fits this step's budget
                           (vLLM's default before V1: `continuous` in the experiments)
    chunked_prefill=True   a prompt may be split over steps, decode tokens and prefill chunks share
                           one budget (Sarathi / DeepSpeed-FastGen Dynamic SplitFuse / vLLM V1)
"""

from __future__ import annotations

import collections
import dataclasses

from continuous_batching.request import Sequence, Status
from paged_attention.block_manager import BlockManager


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    seq_id: int
    num_new_tokens: int  # the sequence's tokens [num_computed, num_computed + num_new_tokens)
    samples: bool  # True when the chunk reaches the end of its tokens: the step samples a token


@dataclasses.dataclass(frozen=True)
class Schedule:
    seqs: list[ScheduledSeq]
    preempted: list[int]  # seq ids preempted (recompute) this step
    block_copies: list[tuple[int, int]]  # copy-on-write (src, dst) to run before the step

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 chunked_prefill: bool = False):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.manager, self.chunked_prefill = manager, chunked_prefill
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order: oldest first

    def add(self, seq: Sequence) -> None:
        if not self.chunked_prefill and seq.num_tokens > self.budget:
            raise ValueError(f"a prompt of {seq.num_tokens} tokens can never fit max_num_batched_tokens="
                             f"{self.budget} without chunked prefill")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        """Plan one step (see the module docstring)."""
        budget, planned, preempted, copies = self.budget, [], [], []
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue  # preempted by an older sequence, or out of budget
            if self.manager.num_tokens(seq.seq_id) < seq.num_tokens:  # its last sampled token needs a slot
                while not self.manager.can_append(seq.seq_id):
                    victim = self.running[-1]
                    self._preempt(victim)
                    preempted.append(victim.seq_id)
                    if victim is seq:
                        break
                if seq not in self.running:
                    continue
                _, cow = self.manager.append_slot(seq.seq_id, seq.output[-1])
                copies += cow
            planned.append(self._plan(seq, budget))
            budget -= planned[-1].num_new_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            tokens = seq.tokens
            if not self.chunked_prefill and len(tokens) > budget:
                break
            if not self.manager.can_allocate(tokens):
                break
            self.waiting.popleft()
            seq.num_computed = self.manager.allocate(seq.seq_id, tokens)
            seq.status = Status.RUNNING
            self.running.append(seq)
            planned.append(self._plan(seq, budget))
            budget -= planned[-1].num_new_tokens
        return Schedule(planned, preempted, copies)

    def _plan(self, seq: Sequence, budget: int) -> ScheduledSeq:
        n = min(seq.num_uncomputed, budget)
        return ScheduledSeq(seq.seq_id, n, samples=seq.num_computed + n == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: free the blocks, requeue at the front, keep the tokens."""
        self.running.remove(seq)
        self.manager.free(seq.seq_id)
        seq.status, seq.num_computed = Status.WAITING, 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, schedule: Schedule, sampled: dict[int, int]) -> list[Sequence]:
        """After the model step: advance computed counts, record sampled tokens, free finished
        sequences. `sampled` maps seq id -> token for every scheduled seq with `samples`. Returns
        the sequences that finished."""
        by_id = {s.seq_id: s for s in self.running}
        finished = []
        for planned in schedule.seqs:
            seq = by_id[planned.seq_id]
            seq.num_computed += planned.num_new_tokens
            if planned.samples:
                seq.append_output(sampled[planned.seq_id])
                if seq.status.finished:
                    self.running.remove(seq)
                    self.manager.free(seq.seq_id)
                    finished.append(seq)
        return finished
