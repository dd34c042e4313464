"""The paged engine in static batches, for the PagedAttention experiments (prefix caching).

A batch is admitted together (as the static engine does), but its KV cache lives in blocks handed out
as tokens arrive, a row that reaches its output length leaves the batch at once and frees its blocks,
and with prefix caching a prompt's full blocks already in the cache are not recomputed: the prompt
pass computes only the uncached suffix, attending to the cached prefix through the block table.
Admitting new requests at every step is the continuous-batching engine's job
(`experiments/continuous_engine.py`).
"""

from __future__ import annotations

import time

import models
from continuous_batching.model_runner import PagedModelRunner
from continuous_batching.request import Sequence
from paged_attention.block_manager import BlockManager
from experiments.trace import BatchOutcome, at_once, kv_bytes_per_token, serve_static_batches, untimed_pass
from experiments.workloads import Request


class PagedStaticEngine:
    def __init__(self, model: models.Model, run_config, requests: list[Request]):
        self.batch_size, self.block_size = run_config.batch_size, run_config.block_size
        longest = max(len(r.prompt) + r.output_len for r in requests)
        max_blocks = -(-longest // self.block_size)
        num_blocks = 2 * self.batch_size * max_blocks  # a batch's worst case, plus room for cached prefixes
        self.manager = BlockManager(num_blocks, self.block_size,
                                    enable_prefix_caching=run_config.enable_prefix_caching)
        self.runner = PagedModelRunner(model, num_blocks=num_blocks, block_size=self.block_size,
                                       max_num_seqs=self.batch_size, max_blocks_per_seq=max_blocks,
                                       backend=run_config.backend)
        self.per_token_bytes = kv_bytes_per_token(model)
        self.requests = requests
        self.prompt_tokens = self.cached_tokens = 0
        self.outputs: dict[int, list[int]] = {}  # request id -> generated tokens (for checks)

    def warmup(self) -> None:
        """One untimed pass over the whole workload compiles every shape its batches need (prompt
        passes vary in token count and longest prompt); then a fresh block manager, so the timed
        run starts with an empty prefix cache."""
        untimed_pass(self, self.requests, f"paged b{self.batch_size}")
        self._forget_warm_up()

    def precompile(self) -> None:
        """Compile every shape the batches reach and run each once: the same pass as `warmup`, with
        a runner that runs a step only when its shape is new (`PagedModelRunner.dry_run`)."""
        self.runner.dry_run = True
        try:
            self.serve(at_once(self.requests), lambda n: None)
        finally:
            self.runner.dry_run = False
        self._forget_warm_up()

    def _forget_warm_up(self) -> None:
        self.manager = BlockManager(self.manager.gpu.num_blocks, self.block_size,
                                    enable_prefix_caching=self.manager.enable_prefix_caching)
        self.prompt_tokens = self.cached_tokens = 0
        self.outputs.clear()

    def serve(self, requests, progress):
        trace = serve_static_batches(requests, self.batch_size, self._run_batch, progress)
        trace.extra_metrics = {
            "prefix_cache_hit_rate": self.manager.hit_rate,
            "cached_prompt_token_fraction": self.cached_tokens / max(1, self.prompt_tokens)}
        return trace

    def _run_batch(self, batch: list[Request]) -> BatchOutcome:
        manager, runner = self.manager, self.runner
        seqs = []
        for r in batch:
            if not manager.can_allocate(list(r.prompt)):
                raise RuntimeError(f"the KV pool cannot hold request {r.request_id}; it was sized for "
                                   "the workload's longest request")
            cached = manager.allocate(r.request_id, list(r.prompt))
            self.prompt_tokens += len(r.prompt)
            self.cached_tokens += cached
            seqs.append(Sequence(r.request_id, list(r.prompt), r.output_len, num_computed=cached,
                                 num_new_tokens=len(r.prompt) - cached,
                                 block_table=manager.get_block_table(r.request_id)))
        for seq, token in zip(seqs, runner.step(seqs).tokens):
            seq.advance(token)
        self.outputs.update({seq.seq_id: seq.output for seq in seqs})  # the same lists, filled as the batch runs
        first_token_time = time.perf_counter()
        live = list(seqs)
        alloc_peak = used_peak = generated = 0
        util_sum, num_steps = 0.0, 0
        while True:
            used_blocks, real = manager.num_used_blocks, manager.num_real_tokens
            alloc_peak, used_peak = max(alloc_peak, used_blocks), max(used_peak, real)
            util_sum += real / max(1, used_blocks * self.block_size)
            num_steps += 1
            generated += len(live)
            for seq in [seq for seq in live if len(seq.output) >= seq.max_tokens]:
                live.remove(seq)
                manager.free(seq.seq_id)
            if not live:
                break
            for seq in live:
                _, copies = manager.append_slot(seq.seq_id, seq.tokens)
                runner.copy_blocks(copies)
                seq.block_table, seq.num_new_tokens = manager.get_block_table(seq.seq_id), 1
            for seq, token in zip(live, runner.step(live).tokens):
                seq.advance(token)
        per_block = self.block_size * self.per_token_bytes
        return BatchOutcome(first_token_time, time.perf_counter(), alloc_peak * per_block,
                            used_peak * self.per_token_bytes, util_sum / num_steps, generated)
