"""KV-memory simulation of the vLLM paper's Fig. 2 and Fig. 13: how much of a fixed KV budget holds
real tokens, and how many requests fit at once, under four ways of reserving memory.

    max     Orca (Max): every request reserves `max_len` slots (the model's maximum length)
    pow2    Orca (Pow2): prompt + output rounded up to a power of two (over-reserves <= 2x output)
    oracle  Orca (Oracle): exactly prompt + output (the output length known in advance)
    paged   vLLM: 16-token blocks from the real block manager, allocated as tokens arrive; a request
            is admitted only if `watermark` of the blocks stay free (vLLM's admission rule); when a
            block cannot be had, the newest request is preempted (recompute)

Every policy schedules at iteration level: each iteration, waiting requests are admitted first-come
first-served while their reservation fits, then every running request produces one token (the first
iteration of a request is its prompt pass). Memory does not depend on the model's arithmetic, so no
model runs here; lengths are the workload's (real ShareGPT token counts). Metrics are averaged over
the iterations in which requests were waiting, i.e. while memory was the bottleneck.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from models.static_batch import bucket_pow2
from paged_attention.block_manager import BlockManager
from experiments.engines import RequestRecord, RunTrace, kv_bytes_per_token
from experiments.workloads import Request


def reservation(policy: str, prompt_len: int, output_len: int, max_len: int) -> int:
    """Slots a contiguous-reservation policy sets aside for one request."""
    if policy == "max":
        return max_len
    if policy == "pow2":
        return prompt_len + bucket_pow2(output_len)
    if policy == "oracle":
        return prompt_len + output_len
    raise ValueError(f"unknown reservation policy {policy!r}; allowed: 'max', 'pow2', 'oracle', 'paged'")


@dataclasses.dataclass
class _Running:
    request: Request
    generated: int = 0
    reserved: int = 0  # contiguous policies only


class MemorySimEngine:
    """A harness engine whose 'time' is model iterations; see the module docstring."""

    simulated = True

    def __init__(self, model, run_config, requests: list[Request]):
        self.policy, self.max_len = run_config.reservation, run_config.max_len
        self.budget, self.block_size = run_config.kv_budget_tokens, run_config.block_size
        self.watermark_blocks = int(run_config.watermark * (self.budget // self.block_size))
        self.per_token_bytes = kv_bytes_per_token(model)
        too_long = [r.request_id for r in requests if len(r.prompt) + r.output_len > self.max_len]
        if too_long:
            raise ValueError(f"requests {too_long[:5]} exceed max_len={self.max_len}; cap the workload")

    def warmup(self) -> None:
        pass

    def serve(self, requests: list[Request], progress) -> RunTrace:
        start = time.perf_counter()
        waiting = collections.deque(sorted(requests, key=lambda r: (r.arrival_s, r.request_id)))
        running: list[_Running] = []
        manager = BlockManager(self.budget // self.block_size, self.block_size) if self.policy == "paged" else None
        reserved_total = iteration = preemptions = 0
        first_token: dict[int, int] = {}
        records: list[RequestRecord] = []
        util_sum = batched_sum = 0.0
        saturated = max_batched = held_peak = 0
        while waiting or running:
            while waiting:  # admit FCFS while the head's reservation fits
                head = waiting[0]
                if manager is not None:
                    need = -(-(len(head.prompt) + 1) // self.block_size)  # prompt + first output
                    if manager.num_free_blocks - need < self.watermark_blocks:
                        break
                    manager.allocate(head.request_id, list(head.prompt))
                    running.append(_Running(waiting.popleft()))
                else:
                    need = reservation(self.policy, len(head.prompt), head.output_len, self.max_len)
                    if reserved_total + need > self.budget:
                        break
                    reserved_total += need
                    running.append(_Running(waiting.popleft(), reserved=need))
            if manager is not None:
                preemptions += self._grow_paged(manager, running, waiting)
            # KV held after this iteration: the prompt, plus the generated tokens fed back so far
            held = sum(len(r.request.prompt) + r.generated for r in running)
            held_peak = max(held_peak, held)
            if waiting:  # memory is the bottleneck now
                saturated += 1
                util_sum += held / self.budget
                batched_sum += len(running)
            max_batched = max(max_batched, len(running))
            finished = []
            for r in running:
                r.generated += 1
                first_token.setdefault(r.request.request_id, iteration)
                if r.generated == r.request.output_len:
                    finished.append(r)
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
                 "sim_seconds": time.perf_counter() - start}
        return RunTrace(records, float(iteration), self.budget * self.per_token_bytes,
                        held_peak * self.per_token_bytes, util_sum / max(1, saturated),
                        sum(r.output_len for r in requests), simulated=True, extra_metrics=extra)

    def _grow_paged(self, manager: BlockManager, running: list[_Running], waiting) -> int:
        """Reserve this iteration's slot for every running request (its prompt pass already holds
        the prompt); preempt the newest requests (recompute) while blocks run out."""
        preempted = 0
        for r in list(running):
            if r not in running or r.generated == 0:
                continue  # prompt pass: allocate() reserved its slots
            while not manager.can_append(r.request.request_id):
                victim = running.pop()  # newest first
                manager.free(victim.request.request_id)
                waiting.appendleft(victim.request)
                preempted += 1
                if victim is r:
                    break
            if r in running:
                manager.append_slot(r.request.request_id, 0)
        return preempted
