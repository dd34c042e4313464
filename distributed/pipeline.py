"""Pipeline parallelism: the decoder's layers split into stages over the mesh's "pp" axis, the batch
into micro-batches that flow through the stages.

    pipe = Pipeline(params, config, make_mesh(pp=2, tp=2), num_microbatches=4)
    logits = pipe.forward(tokens, positions)      # == forward(params, tokens, positions) on one device
    pipe.init_caches(num_blocks, block_size)      # each stage: a paged KV cache for its own layers
    logits = pipe.paged_step(microbatches, backend="paged_cpu")   # one engine step, micro-batched

Stage s holds layers `stage_layers(num_layers, pp)[s]` (contiguous, as balanced as the count
allows) on its own slice of the mesh (its "tp" devices, where tensor parallelism splits them with
`tensor_parallel.param_specs`); the first stage also holds the embedding, the last the final norm
and LM head. A micro-batch's activations (the hidden state and the residual, `[tokens, hidden]`)
are copied to the next stage's devices after each stage: the only traffic between stages,
FasterTransformer's and DeepSpeed's point-to-point send. Each stage is one jitted program, and jax
dispatches asynchronously, so while stage 1 runs micro-batch 0, stage 0 already runs micro-batch 1:
the GPipe schedule, with its bubble of (pp - 1) stage-times at the start and the end, emerges from
the loop order, with no scheduler of our own.

With a KV cache (`init_caches`), each stage keeps the paged cache of its own layers only, over the
same block ids (one block table serves every stage), so a device holds 1 / pp of the cache. An
engine step's sequences are cut into micro-batches, each with its own inputs and paged metadata
(`paged_step`): the micro-batches are in flight together, stage 0 on the next while the later
stages run the earlier ones (the engine's runner samples them once all have left the last stage).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from distributed.head_parallel import HeadParallelOps
from distributed.mesh import axis_size
from distributed.tensor_parallel import kv_cache_spec, shard_params
from models.config import ModelConfig
from models.llama import decoder_layer, final_logits
from models.ops import Ops, get_ops, rope_cos_sin
from paged_attention.kv_cache import copy_blocks, init_paged_kv_cache


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges, one per stage; the first `num_layers % pp` stages take one more."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"pp must be between 1 and the model's {num_layers} layers, got {pp}")
    size, extra = divmod(num_layers, pp)
    bounds = np.cumsum([0] + [size + (s < extra) for s in range(pp)])
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def stage_meshes(mesh: Mesh) -> list[Mesh]:
    """One mesh per pipeline stage: the stage's ("dp", "tp") devices of a ("dp", "pp", "tp") mesh."""
    return [Mesh(mesh.devices[:, s, :], ("dp", "tp")) for s in range(axis_size(mesh, "pp"))]


@functools.partial(jax.jit, static_argnames=("config", "first", "last", "backend", "ops"), donate_argnames=("cache",))
def run_stage(stage_params: dict, cache, hidden, residual, positions, metadata=None, logits_indices=None, *,
              config: ModelConfig, first: bool, last: bool, backend: str = "contiguous", ops: Ops = None):
    """One stage on one micro-batch: (embedding,) its layers, reading and writing `cache` (its own
    layers' caches, or None: attention within the tokens), (final norm and LM head at
    `logits_indices`). Returns (hidden, residual, cache), the last stage (logits, None, cache)."""
    ops = ops or get_ops("xla")
    if first:
        hidden = ops.embed(stage_params["embed"], hidden)  # hidden holds the tokens on the first stage
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta)
    new_cache = None if cache is None else []
    for i, layer in enumerate(stage_params["layers"]):
        hidden, residual, layer_cache = decoder_layer(layer, hidden, residual, cos, sin,
                                                      None if cache is None else cache[i], positions, metadata,
                                                      config=config, backend=backend, ops=ops)
        if new_cache is not None:
            new_cache.append(layer_cache)
    if not last:
        return hidden, residual, new_cache
    return final_logits(stage_params, hidden, residual, config=config, ops=ops,
                        logits_indices=logits_indices), None, new_cache


class Pipeline:
    """The model's params placed stage by stage on `mesh` (module docstring)."""

    def __init__(self, params: dict, config: ModelConfig, mesh: Mesh, num_microbatches: int = 1):
        self.config, self.num_microbatches = config, num_microbatches
        self.meshes = stage_meshes(mesh)
        self.ranges = stage_layers(config.num_layers, len(self.meshes))
        self.stages = []
        for s, (stage_mesh, layers) in enumerate(zip(self.meshes, self.ranges)):
            stage = {"layers": [params["layers"][i] for i in layers]}
            if s == 0 or (s == len(self.meshes) - 1 and config.tie_word_embeddings):
                stage["embed"] = params["embed"]
            if s == len(self.meshes) - 1:
                stage["final_norm"] = params["final_norm"]
                if not config.tie_word_embeddings:
                    stage["lm_head"] = params["lm_head"]
            self.stages.append(shard_params(stage, config, stage_mesh))
        self.caches = None  # per stage: its layers' paged (k, v) caches, after init_caches

    def _walk(self, microbatches: list[tuple], caches: list | None, **static) -> tuple[list[jax.Array], list | None]:
        """Each micro-batch (tokens, positions, metadata, logits_indices) through every stage, in
        order (dispatch is asynchronous: stages overlap), on the stages' `caches` (None: none);
        returns each micro-batch's logits and the updated caches."""
        outputs, last = [], len(self.stages) - 1
        caches = None if caches is None else list(caches)
        ops = static.pop("ops", None)
        if isinstance(ops, HeadParallelOps):  # attention on each stage's own devices
            stage_ops = [dataclasses.replace(ops, mesh=stage_mesh) for stage_mesh in self.meshes]
        else:
            stage_ops = [ops] * len(self.meshes)
        for tokens, positions, metadata, logits_indices in microbatches:
            hidden, residual = tokens, None
            for s, (stage, stage_mesh) in enumerate(zip(self.stages, self.meshes)):
                hidden, residual, positions, metadata, logits_indices = jax.device_put(
                    (hidden, residual, positions, metadata, logits_indices), NamedSharding(stage_mesh, P()))
                hidden, residual, cache = run_stage(stage, None if caches is None else caches[s], hidden, residual,
                                                    positions, metadata, logits_indices, config=self.config,
                                                    first=s == 0, last=s == last, ops=stage_ops[s], **static)
                if caches is not None:
                    caches[s] = cache
            outputs.append(hidden)
        return outputs, caches

    def forward(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """f32 logits [batch, tokens, vocab] of tokens, positions i32[batch, tokens], without a KV
        cache; the batch is cut into `num_microbatches` equal micro-batches (it must divide)."""
        batch = tokens.shape[0]
        if batch % self.num_microbatches:
            raise ValueError(f"batch {batch} does not split into num_microbatches={self.num_microbatches} "
                             f"equal micro-batches; allowed: a divisor of {batch}")
        size = batch // self.num_microbatches
        rows = [slice(m * size, (m + 1) * size) for m in range(self.num_microbatches)]
        outputs, _ = self._walk([(tokens[r], positions[r], None, None) for r in rows], None)
        return jax.numpy.concatenate([jax.device_put(o, outputs[0].sharding) for o in outputs])

    def init_caches(self, num_blocks: int, block_size: int, dtype=jax.numpy.float32) -> None:
        """A zeroed paged KV cache per stage for its own layers (same block ids on every stage),
        split by KV head over the stage's "tp" devices where they divide."""
        c = self.config
        self.caches = [jax.device_put(init_paged_kv_cache(len(layers), num_blocks, block_size, c.num_kv_heads,
                                                          c.head_dim, dtype),
                                      NamedSharding(stage_mesh, kv_cache_spec(c, axis_size(stage_mesh, "tp"))))
                       for layers, stage_mesh in zip(self.ranges, self.meshes)]

    def paged_step(self, microbatches: list[tuple], *, backend: str, ops: Ops) -> list[jax.Array]:
        """One engine step, micro-batched: each (tokens i32[n], positions i32[n], paged metadata,
        logits_indices i32[rows]) through the stages on their caches; f32 logits [rows, vocab] per
        micro-batch, on the last stage's devices."""
        if self.caches is None:
            raise ValueError("paged_step needs a KV cache per stage: call init_caches first")
        outputs, self.caches = self._walk(microbatches, self.caches, backend=backend, ops=ops)
        return outputs

    def copy_blocks(self, src: jax.Array, dst: jax.Array) -> None:
        """Copy-on-write: whole blocks src[i] -> dst[i] in every stage's cache."""
        self.caches = [copy_blocks(cache, src, dst) for cache in self.caches]
