"""KV-memory simulation of the vLLM paper's Fig. 2 and Fig. 13: how much of a fixed KV budget holds
real tokens, and how many requests fit at once, under four ways of reserving memory.

    max     Orca (Max): every request reserves `max_len` slots (the model's maximum length)
    pow2    Orca (Pow2): prompt + the output length rounded up to a power of two (at most max_len)
    oracle  Orca (Oracle): exactly prompt + output (the output length known in advance)
    paged   vLLM: 16-token blocks from the real block manager, allocated as tokens arrive; a request
            is admitted only if `watermark` of the blocks stay free (vLLM's admission rule); when a
            block cannot be had, the newest request is preempted by recompute (below)

Every policy schedules at iteration level: each iteration, every running request first gets the slot
for the token it sampled last (paged only), then waiting requests are admitted first-come first-served
while their reservation fits, then every running request produces one token (the first iteration of
a request is its prompt pass). This is the order of continuous_batching/scheduler.py: running
requests before admissions. The contiguous policies reserve everything at admission, so they never
preempt.

Recompute preemption (vLLM's, and continuous_batching/scheduler.py's): the victim's blocks are freed
and it goes back to the front of the queue with its prompt and the tokens it generated so far. When
it is admitted again, its prompt pass covers prompt + generated tokens (the block manager is
allocated with all of them; admission asks for their blocks plus one slot, above the watermark),
recomputes their KV in one pass and samples the request's next token; it then needs only
`output_len - generated` more tokens, and its first-token time stays its first ever. No output token
is produced twice, so the tokens sampled equal the workload's output tokens; `recomputed_tokens`
counts the prompt + generated tokens whose KV resumptions computed again.

Memory does not depend on the model's arithmetic, so no model runs here; lengths are the workload's
(real ShareGPT token counts). Metrics are averaged over the iterations in which requests were
waiting after admission, i.e. while memory was the bottleneck: `kv_utilization` is the KV held
(prompt + generated tokens of each running request, a resumed request's recomputed ones included)
over the budget, `mean_batched_requests` the requests running. A budget that cannot hold one
request's reservation (paged: its prompt + output tokens, the most a resumption can need, above the
watermark) is rejected with the smallest budget that would work.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from continuous_batching.reservation import RESERVATIONS, reservation_tokens
from paged_attention.block_manager import BlockManager
from experiments.trace import RequestRecord, RunTrace, kv_bytes_per_token
from experiments.workloads import Request


def reservation(policy: str, prompt_len: int, output_len: int, max_len: int) -> int:
    """Slots a contiguous-reservation policy sets aside for one request: the engine's rule
    (`continuous_batching.reservation.reservation_tokens`), with the output length known."""
    if policy not in RESERVATIONS:
        raise ValueError(f"unknown reservation policy {policy!r}; allowed: 'max', 'pow2', 'oracle', 'paged'")
    return reservation_tokens(policy, prompt_len, output_len, max_len)


@dataclasses.dataclass
class _Running:
    request: Request
    generated: int = 0  # output tokens sampled so far; a recompute preemption keeps them
    reserved: int = 0  # contiguous policies only

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens: what a (re)admission's prompt pass computes."""
        return len(self.request.prompt) + self.generated


class MemorySimEngine:
    """A harness engine whose 'time' is model iterations; see the module docstring."""

    simulated = True

    def __init__(self, model, run_config, requests: list[Request]):
        self.policy, self.max_len = run_config.reservation, run_config.max_len
        self.budget, self.block_size = run_config.kv_budget_tokens, run_config.block_size
        self.watermark = run_config.watermark
        self.watermark_blocks = int(self.watermark * (self.budget // self.block_size))
        self.per_token_bytes = kv_bytes_per_token(model)
        too_long = [r.request_id for r in requests if len(r.prompt) + r.output_len > self.max_len]
        if too_long:
            raise ValueError(f"requests {too_long[:5]} exceed max_len={self.max_len}; cap the workload")

    def warmup(self) -> None:
        pass

    def _blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _check_budget(self, requests: list[Request]) -> None:
        """Raise if some request can never be served within the budget (the simulation would wait
        for it forever). Paged: a request preempted just before its last token is readmitted with
        prompt + output_len - 1 tokens + 1 slot, which must fit above the watermark."""
        if not requests:
            return
        if self.policy != "paged":
            need, rid = max((reservation(self.policy, len(r.prompt), r.output_len, self.max_len), r.request_id)
                            for r in requests)
            if need > self.budget:
                raise ValueError(f"kv_budget_tokens={self.budget} cannot hold request {rid}'s {self.policy} "
                                 f"reservation of {need} slots; the smallest budget that would work is {need}")
            return
        need, rid = max((self._blocks(len(r.prompt) + r.output_len), r.request_id) for r in requests)
        if self.budget // self.block_size - self.watermark_blocks >= need:
            return
        blocks = need  # the fewest blocks whose share above the watermark holds `need`
        while blocks - int(self.watermark * blocks) < need:
            blocks += 1
        raise ValueError(f"kv_budget_tokens={self.budget} cannot serve request {rid}: its prompt + output "
                         f"tokens need {need} blocks of {self.block_size} above the watermark "
                         f"({self.watermark:g} of the blocks); the smallest budget that would work is "
                         f"{blocks * self.block_size}")

    def serve(self, requests: list[Request], progress) -> RunTrace:
        self._check_budget(requests)
        start = time.perf_counter()
        waiting = collections.deque(_Running(r) for r in sorted(requests, key=lambda r: (r.arrival_s, r.request_id)))
        running: list[_Running] = []
        manager = BlockManager(self.budget // self.block_size, self.block_size) if self.policy == "paged" else None
        reserved_total = iteration = preemptions = recomputed = sampled = 0
        first_token: dict[int, int] = {}
        records: list[RequestRecord] = []
        util_sum = batched_sum = 0.0
        saturated = max_batched = held_peak = 0
        while waiting or running:
            if manager is not None:  # running requests first, as continuous_batching/scheduler.py does
                preemptions += self._grow_paged(manager, running, waiting)
            while waiting:  # admit FCFS while the head's reservation fits
                head = waiting[0]
                if manager is not None:
                    # prompt pass over prompt + tokens generated before a preemption, + the next token
                    need = self._blocks(head.num_tokens + 1)
                    if manager.num_free_blocks - need < self.watermark_blocks:
                        break
                    manager.allocate(head.request.request_id, list(head.request.prompt) + [0] * head.generated)
                    if head.generated:
                        recomputed += head.num_tokens
                else:
                    head.reserved = reservation(self.policy, len(head.request.prompt), head.request.output_len,
                                                self.max_len)
                    if reserved_total + head.reserved > self.budget:
                        break
                    reserved_total += head.reserved
                running.append(waiting.popleft())
            if not running:  # _check_budget rules this out; never spin
                raise RuntimeError(f"request {waiting[0].request.request_id} cannot be admitted into an "
                                   f"empty KV budget of {self.budget} tokens")
            # KV held after this iteration: the prompt, plus the generated tokens fed back so far
            # (for a resumed request, all of them: its prompt pass recomputes them)
            held = sum(r.num_tokens for r in running)
            held_peak = max(held_peak, held)
            if waiting:  # memory is the bottleneck now
                saturated += 1
                util_sum += held / self.budget
                batched_sum += len(running)
            max_batched = max(max_batched, len(running))
            finished = []
            for r in running:  # one token each; a (re)admitted request's prompt pass samples its next one
                r.generated += 1
                first_token.setdefault(r.request.request_id, iteration)  # kept across preemptions
                if r.generated == r.request.output_len:
                    finished.append(r)
            sampled += len(running)
            for r in finished:
                running.remove(r)
                reserved_total -= r.reserved
                if manager is not None:
                    manager.free(r.request.request_id)
                rid = r.request.request_id
                records.append(RequestRecord(rid, len(r.request.prompt), r.request.output_len, 0.0,
                                             float(first_token[rid] + 1), float(iteration + 1)))
            progress(len(finished))
            iteration += 1
        extra = {"mean_batched_requests": batched_sum / max(1, saturated),
                 "max_concurrent_requests": max_batched, "iterations": iteration,
                 "saturated_iterations": saturated, "preemptions": preemptions,
                 "recomputed_tokens": recomputed, "sim_seconds": time.perf_counter() - start}
        return RunTrace(records, float(iteration), self.budget * self.per_token_bytes,
                        held_peak * self.per_token_bytes, util_sum / max(1, saturated),
                        sampled, simulated=True, extra_metrics=extra)

    def _grow_paged(self, manager: BlockManager, running: list[_Running], waiting) -> int:
        """Give every running request, oldest first, the slot for the token it sampled last; while
        blocks run out, preempt the newest running request by recompute (blocks freed, back to the
        front of the queue with its generated tokens kept)."""
        preempted = 0
        for r in list(running):
            if r not in running:
                continue  # preempted for an older request's slot
            rid = r.request.request_id  # its prompt pass is done: admissions come after this
            while not manager.can_append(rid):
                victim = running.pop()  # newest first
                manager.free(victim.request.request_id)
                waiting.appendleft(victim)
                preempted += 1
                if victim is r:
                    break
            if r in running:
                manager.append_slot(rid, range(r.num_tokens))  # ids do not matter without prefix caching
        return preempted
