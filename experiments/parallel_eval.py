"""The parallelism benchmark (`engine: parallel_eval`): one tensor x pipeline layout of the
experiment's model, measured for memory per device, traffic between devices and step time.

- memory: `param_bytes_per_device` and `kv_bytes_per_device`, the most any one device holds in its
  own memory of the engine runner's placed params and of its paged KV cache holding the decode
  batch's contexts; `host_param_bytes`, the weights left in host memory (`offload_layers`: the last
  layers, brought to the device as they run, `distributed/offload.py`; one device);
- traffic: the collectives in the compiled HLO of one decode step of `batch_size` sequences
  (tensor parallel, pp 1; `distributed/hlo_comm.py`), their all-reduce and all-gather bytes beside
  Megatron-LM's count, (2 per layer + 1 for the vocab-parallel embedding) all-reduces of a
  [rows, hidden] activation; the activation bytes a decode step hands from stage to stage (hidden
  state and residual of every row at each of the pp - 1 boundaries). Rows are what the step
  programs run on: the sequences padded to the bucketed batch (at least 4 rows per program, so a
  pipeline's micro-batches of 2 sequences each hand over 4 rows);
- time: `decode_step_ms` (the runner's step, pages scattered; pipeline runs cut it into pp
  micro-batches) and `prefill_ms` (the full forward over `batch_size` x `prompt_len` tokens: jitted
  on the Megatron-sharded params, or through the pipeline's stages and `microbatches`), medians of
  `iterations`;
- exactness: `logit_max_abs_gap`, that forward's logits against one device's.
On fake CPU devices the times show structure, not accelerator speed: every device shares the host's
cores.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import models
from continuous_batching.pipeline_runner import PipelineModelRunner
from continuous_batching.request import Sequence
from distributed.head_parallel import runner_ops
from distributed.hlo_comm import collectives
from distributed.mesh import make_mesh
from distributed.offload import HOST, bytes_by_memory, offload_placement, offload_shardings
from distributed.pipeline import Pipeline
from distributed.tensor_parallel import runner_placement, shard_params
from experiments.decode_step import scattered_runner
from experiments.roofline import median_seconds
from experiments.trace import RunTrace
from models.llama import forward


def bytes_per_device(tree) -> int:
    """The most bytes of `tree`'s arrays that any one device holds in its own memory (host-memory
    arrays, `distributed/offload.py`, left out)."""
    held: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        if leaf.sharding.memory_kind not in (None, "device"):
            continue
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


def megatron_allreduce_bytes(config, rows: int, tp: int, itemsize: int) -> int:
    """Megatron-LM's all-reduce payload for one step of `rows` token rows (as compiled, padding
    included): two per layer (attention output, MLP down) plus one for the vocab-parallel
    embedding, each a [rows, hidden] activation of `itemsize` bytes per element."""
    return 0 if tp == 1 else (2 * config.num_layers + 1) * rows * config.hidden_size * itemsize


class ParallelEvalEngine:
    times_itself = True  # warms up and times each measurement inside serve

    def __init__(self, model: models.Model, run_config, requests):
        del requests  # the shapes come from the run config
        self.model, self.run_config = model, run_config
        self.mesh = None if run_config.offload_layers else make_mesh(tp=run_config.tp, pp=run_config.pp)

    def warmup(self) -> None:
        pass  # each measurement warms itself up

    def _prefill(self) -> dict:
        """The full forward over batch_size x prompt_len tokens: time and logit gap vs one device."""
        rc, config = self.run_config, self.model.config
        vocab = config.vocab_size
        tokens = jnp.asarray(np.random.default_rng(0).integers(3, vocab, (rc.batch_size, rc.prompt_len)), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(rc.prompt_len), tokens.shape)
        one_device = jax.jit(lambda params: forward(params, tokens, positions, config=config)[0])
        if rc.offload_layers:
            placed = jax.device_put(self.model.params, offload_shardings(self.model.params, rc.offload_layers))
            run = lambda: one_device(placed)  # noqa: E731
        elif rc.pp == 1:
            sharded = shard_params(self.model.params, config, self.mesh)
            run = lambda: one_device(sharded)  # noqa: E731
        else:
            pipe = Pipeline(self.model.params, config, self.mesh, num_microbatches=rc.microbatches)
            run = lambda: pipe.forward(tokens, positions)  # noqa: E731
        gap = float(jnp.abs(run() - one_device(self.model.params)).max())
        return {"prefill_ms": 1e3 * median_seconds(lambda: run().block_until_ready(), rc.iterations),
                "logit_max_abs_gap": gap}

    def _decode(self) -> dict:
        """One paged decode step of batch_size sequences through the engine's runner on the mesh
        (pipeline: micro-batched over the stages): bytes per device, collectives, time."""
        rc, config = self.run_config, self.model.config
        lens = [rc.context_len] * rc.batch_size
        if rc.offload_layers:
            placement = offload_placement(rc.offload_layers)
        elif rc.pp > 1:
            placement = {"runner_class": PipelineModelRunner}
        else:
            placement = runner_placement(config, self.mesh)
        runner, tables = scattered_runner(self.model, lens, np.random.default_rng(0), "paged_cpu",
                                          kernels=runner_ops(config, self.mesh, "xla"), mesh=self.mesh, **placement)
        seqs = [Sequence.in_cache(t, n, [5]) for t, n in zip(tables, lens)]
        comm = None if rc.pp > 1 else collectives(runner.lower(runner.prepare(seqs)).compile().as_text())
        # token rows each step program runs on (micro-batches, each padded to its bucketed shape)
        rows = sum(runner.prepare(chunk).shape.decode_seqs for chunk in runner.microbatches(seqs))
        itemsize = jnp.dtype(self.model.dtype).itemsize
        handoff = (rc.pp - 1) * 2 * rows * config.hidden_size * itemsize  # hidden + residual rows per boundary
        return {"param_bytes_per_device": bytes_per_device(runner.params),
                "host_param_bytes": bytes_by_memory(runner.params).get(HOST, 0),
                "kv_bytes_per_device": bytes_per_device(runner.kv_cache),
                "collectives_per_decode_step": None if comm is None else sum(c["count"] for c in comm.values()),
                "allreduce_bytes_per_decode_step": None if comm is None else comm["all-reduce"]["bytes"],
                "allgather_bytes_per_decode_step": None if comm is None else comm["all-gather"]["bytes"],
                "megatron_allreduce_bytes_per_decode_step": None if comm is None else megatron_allreduce_bytes(
                    config, rows, rc.tp, itemsize),
                "stage_handoff_bytes_per_decode_step": handoff,
                "decode_step_ms": 1e3 * median_seconds(lambda: runner.step(seqs), rc.iterations)}

    def serve(self, requests, progress) -> RunTrace:
        start = time.perf_counter()
        extra = {"devices": self.run_config.tp * self.run_config.pp, **self._decode(), **self._prefill()}
        progress(len(requests))
        return RunTrace([], time.perf_counter() - start, 0, 0, 1.0, 0, simulated=True, extra_metrics=extra)
