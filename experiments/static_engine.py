"""Our naive engine in the harness: FasterTransformer-style static batches on a contiguous KV cache
(`models/static_batch.py`), served by the shared static-batch loop (`trace.serve_static_batches`)."""

from __future__ import annotations

import models
from models.static_batch import batch_shape, run_static_batch
from models.sampling import SamplingConfig
from experiments.trace import BatchOutcome, serve_static_batches, untimed_pass
from experiments.workloads import Request


class StaticEngine:
    """Our naive engine: FasterTransformer-style static batches on a contiguous KV cache sized per
    batch (`[batch_size, its longest prompt (bucketed) + its largest output]`, as FT sizes its cache
    per call)."""

    def __init__(self, model: models.Model, run_config, requests: list[Request]):
        self.model, self.batch_size, self.requests = model, run_config.batch_size, requests
        self.greedy = SamplingConfig()
        self.outputs: dict[int, list[int]] = {}  # request id -> generated tokens (for checks)

    def _run(self, prompts, output_lens, row_ids, max_decode_steps=None):
        return run_static_batch(self.model.params, self.model.config, prompts, output_lens,
                                [self.greedy] * len(prompts), row_ids=row_ids, ignore_eos=True,
                                batch_size=self.batch_size, max_decode_steps=max_decode_steps)

    def warmup(self) -> None:
        untimed_pass(self, self.requests, f"static b{self.batch_size}")

    def precompile(self) -> None:
        """Compile the programs of every batch the workload forms when it arrives at once: each
        distinct (padded prompt length, cache length) runs its prefill and one decode step."""
        arrived = sorted(self.requests, key=lambda r: r.arrival_s)
        seen = set()
        for start in range(0, len(arrived), self.batch_size):
            batch = arrived[start:start + self.batch_size]
            shape = batch_shape([len(r.prompt) for r in batch], [r.output_len for r in batch], self.batch_size)
            if shape not in seen:
                seen.add(shape)
                self._run([list(r.prompt) for r in batch], [r.output_len for r in batch],
                          [r.request_id for r in batch], max_decode_steps=1)

    def serve(self, requests, progress):
        def run_batch(batch: list[Request]) -> BatchOutcome:
            result = self._run([list(r.prompt) for r in batch], [r.output_len for r in batch],
                               [r.request_id for r in batch])
            self.outputs.update({r.request_id: list(tokens) for r, tokens in zip(batch, result.tokens)})
            generated = self.batch_size * (result.decode_steps + 1)
            return BatchOutcome(result.first_token_time, result.end_time, result.kv_bytes_allocated,
                                result.kv_bytes_used, result.kv_bytes_used_mean / result.kv_bytes_allocated,
                                generated)

        return serve_static_batches(requests, self.batch_size, run_batch, progress)
