"""The paged model runner over pipeline stages (`EngineConfig.pp > 1`): the same scheduler, block
tables and step preparation as `PagedModelRunner`, with the model split by `distributed.Pipeline`.

Each step's sequences are cut into up to `pp` micro-batches (contiguous, as even as the count
allows; pp of them are the fewest that keep every stage busy once the pipeline fills), each
prepared on its own (its own bucketed shape and paged metadata, `PagedModelRunner.prepare`), then
walked through the stages in order: jax's asynchronous dispatch lets stage 0 run micro-batch 1
while stage 1 runs micro-batch 0 (the in-flight micro-batches of FasterTransformer's and vLLM's
pipeline parallelism). Each stage keeps the paged KV cache of its own layers over the same block
ids, so one block table serves all stages and a copy-on-write copies the block in every stage.
The last stage's logits are sampled on its devices by the runner's sampler, one program per
micro-batch. Swapping to host memory is not supported here (preemption recomputes).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from continuous_batching.model_runner import PagedModelRunner, _sample_alone
from continuous_batching.prepared_step import PreparedStep
from distributed.mesh import axis_size
from distributed.pipeline import Pipeline


class PipelineModelRunner(PagedModelRunner):
    """`PagedModelRunner` whose params and KV cache live on the stages of a ("dp", "pp", "tp") mesh."""

    def _place(self, params, num_blocks: int, block_size: int, dtype, mesh, param_sharding, kv_sharding) -> None:
        if self.num_cpu_blocks:
            raise ValueError(f"num_cpu_blocks must be 0 with pipeline stages (got {self.num_cpu_blocks}): "
                             f"swapping is not supported across stages; use preemption='recompute'")
        self.num_microbatches = axis_size(mesh, "pp")
        self.pipeline = Pipeline(params, self.model.config, mesh)
        self.pipeline.init_caches(num_blocks, block_size, dtype)
        self.params = self.pipeline.stages
        self.input_sharding = None  # each stage places its own inputs
        self._last_stage = NamedSharding(self.pipeline.meshes[-1], PartitionSpec())

    @property
    def kv_cache(self) -> list:
        """Every stage's layer caches, first layer first."""
        return [layer for stage in self.pipeline.caches for layer in stage]

    def run(self, prepared: PreparedStep) -> tuple[np.ndarray, object]:
        return self.run_microbatches([prepared])[0]

    def run_microbatches(self, prepared: list[PreparedStep]) -> list[tuple[np.ndarray, object]]:
        """Walk the prepared micro-batches through the stages, then sample each on the last stage:
        [(i32[rows] next tokens on the host, device log-probs or None)] per micro-batch."""
        for p in prepared:
            self.record_shape(p)
        logits = self.pipeline.paged_step([p.inputs[:4] for p in prepared], backend=self.backend, ops=self.ops)
        sampled = [_sample_alone(rows, jax.device_put(p.inputs[4], self._last_stage), p.flags)
                   for rows, p in zip(logits, prepared)]
        return [(np.asarray(tokens), logprobs) for tokens, logprobs in sampled]

    def lower(self, prepared: PreparedStep):
        raise NotImplementedError("a pipelined step is one program per stage and micro-batch, not one to lower")

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src, dst = (np.asarray(x, np.int32) for x in zip(*copies))
            self.pipeline.copy_blocks(src, dst)
