"""Pipeline parallelism: the decoder's layers split into stages over the mesh's "pp" axis, the batch
into micro-batches that flow through the stages GPipe-style.

    pipe = Pipeline(params, config, make_mesh(pp=2, tp=2), num_microbatches=4)
    logits = pipe.forward(tokens, positions)      # == forward(params, tokens, positions) on one device

Stage s holds layers `stage_layers(num_layers, pp)[s]` (contiguous, as balanced as the count
allows) on its own slice of the mesh (its "tp" devices, where tensor parallelism splits them with
`tensor_parallel.param_specs`); the first stage also holds the embedding, the last the final norm
and LM head. A micro-batch's activations (the hidden state and the residual, `[mb, tokens,
hidden]`) are copied to the next stage's devices after each stage: the only traffic between stages,
FasterTransformer's and DeepSpeed's point-to-point send. Each stage is one jitted program, and jax
dispatches asynchronously, so while stage 1 runs micro-batch 0, stage 0 already runs micro-batch 1:
the GPipe schedule, with its bubble of (pp - 1) stage-times at the start and the end, emerges from
the loop order, with no scheduler of our own. This is the full-sequence (prefill) forward without a
KV cache; decode with in-flight micro-batches needs a cache per stage (not here yet).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from distributed.mesh import axis_size
from distributed.tensor_parallel import shard_params
from models.config import ModelConfig
from models.llama import decoder_layer
from models.ops import get_ops, rope_cos_sin


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


@functools.partial(jax.jit, static_argnames=("config", "first", "last"))
def _run_stage(stage_params: dict, hidden, residual, positions, *, config: ModelConfig, first: bool, last: bool):
    """One stage on one micro-batch: (embedding,) its layers, (final norm and LM head)."""
    ops = get_ops("xla")
    if first:
        hidden = ops.embed(stage_params["embed"], hidden)  # hidden holds the tokens on the first stage
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta)
    for layer in stage_params["layers"]:
        hidden, residual, _ = decoder_layer(layer, hidden, residual, cos, sin, None, positions, None,
                                            config=config, backend="contiguous", ops=ops)
    if not last:
        return hidden, residual
    x, _ = ops.rms_norm(hidden, stage_params["final_norm"], config.rms_norm_eps, residual)
    head = stage_params["embed"] if config.tie_word_embeddings else stage_params["lm_head"]
    return ops.logits(x, head, transposed=config.tie_word_embeddings), None


class Pipeline:
    """The model's params placed stage by stage on `mesh` (module docstring); `forward` runs it."""

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

    def forward(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """f32 logits [batch, tokens, vocab] of tokens, positions i32[batch, tokens]; the batch is cut
        into `num_microbatches` equal micro-batches (it must divide)."""
        batch = tokens.shape[0]
        if batch % self.num_microbatches:
            raise ValueError(f"batch {batch} does not split into num_microbatches={self.num_microbatches} "
                             f"equal micro-batches; allowed: a divisor of {batch}")
        size, last = batch // self.num_microbatches, len(self.stages) - 1
        outputs = []
        for m in range(self.num_microbatches):  # each micro-batch walks the stages; dispatch is async
            rows = slice(m * size, (m + 1) * size)
            hidden, residual = tokens[rows], None
            for s, (stage, stage_mesh) in enumerate(zip(self.stages, self.meshes)):
                on_stage = NamedSharding(stage_mesh, P())
                hidden, residual, pos = jax.device_put((hidden, residual, positions[rows]), on_stage)
                hidden, residual = _run_stage(stage, hidden, residual, pos, config=self.config,
                                              first=s == 0, last=s == last)
            outputs.append(hidden)
        return jnp.concatenate([jax.device_put(o, outputs[0].sharding) for o in outputs])
