"""A Megatron decoder layer written out with `jax.shard_map`: the collectives by hand.

`tensor_parallel.py` gives XLA shardings and lets its partitioner insert the collectives; here each
device runs the unchanged `models.llama.decoder_layer` on its own shards, and the two all-reduces
Megatron-LM needs per layer are explicit `lax.psum`s:

    x (replicated) -> RMSNorm -> q, k, v = x @ wq|wk|wv[:, my heads]     column-parallel, no comm
                   -> attention over my heads
                   -> partial = out[my heads] @ wo[my rows, :]           row-parallel
                   -> psum(partial)                                      all-reduce 1
                   -> RMSNorm -> silu(x @ w_gate[:, mine]) * (x @ w_up[:, mine])
                   -> psum(... @ w_down[my rows, :])                     all-reduce 2

The ops set `TensorParallelOps` adds the psum to `linear` for weights wrapped in `RowParallel`, so
the model's code is the same one a single device runs; the layer sees a local config (its share of
the heads). Where the KV heads are fewer than the devices (tp a multiple of num_kv_heads), each KV
head's columns are repeated so every device holds the one KV head its query heads read, as vLLM
does. The shapes must split along heads: `tensor_parallel_sizes` lists the tp degrees that do.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from distributed.mesh import axis_size
from distributed.tensor_parallel import param_specs
from models.config import ModelConfig
from models.llama import decoder_layer
from models.ops import Ops


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowParallel:
    """A row-parallel weight shard: its matmul gives a partial sum, all-reduced by TensorParallelOps."""

    weight: jax.Array  # [in / tp, out] on each device


@dataclasses.dataclass(frozen=True)
class TensorParallelOps(Ops):
    """The `xla` ops set inside `shard_map`: a RowParallel weight's product is psum-ed over `axis`."""

    name: str = "xla-tp"
    axis: str = "tp"

    def linear(self, x, weight):
        if isinstance(weight, RowParallel):
            return jax.lax.psum(super().linear(x, weight.weight), self.axis)
        return super().linear(x, weight)


def tensor_parallel_sizes(config: ModelConfig, max_tp: int = 64) -> list[int]:
    """The tp degrees up to `max_tp` that split this model along heads: query heads and MLP units
    divide, and KV heads divide or are a divisor of tp (then repeated)."""
    return [tp for tp in range(1, max_tp + 1)
            if config.num_heads % tp == 0 and config.intermediate_size % tp == 0
            and (config.num_kv_heads % tp == 0 or tp % config.num_kv_heads == 0)]


def local_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The share of the heads one of `tp` devices runs (at least one KV head each)."""
    if tp not in tensor_parallel_sizes(config, tp):
        raise ValueError(f"tp {tp} does not split {config.name} along heads (num_heads {config.num_heads}, "
                         f"num_kv_heads {config.num_kv_heads}, intermediate_size {config.intermediate_size}); "
                         f"tp that work: {tensor_parallel_sizes(config, 16)}")
    return dataclasses.replace(config, num_heads=config.num_heads // tp,
                               num_kv_heads=max(config.num_kv_heads // tp, 1))


def megatron_layer_params(layer: dict, config: ModelConfig, tp: int) -> dict:
    """One layer's params (unfused layout) ready for `megatron_layer`: wo and w_down marked
    RowParallel, and wk / wv with each KV head's columns repeated tp / num_kv_heads times when
    the KV heads are fewer than the devices."""
    layer = dict(layer, wo=RowParallel(layer["wo"]), w_down=RowParallel(layer["w_down"]))
    if config.num_kv_heads < tp:
        repeats = tp // config.num_kv_heads
        for name in ("wk", "wv"):
            w = layer[name].reshape(config.hidden_size, config.num_kv_heads, config.head_dim)
            layer[name] = jnp.repeat(w, repeats, axis=1).reshape(config.hidden_size, tp * config.head_dim)
    return layer


def megatron_layer(layer: dict, config: ModelConfig, mesh: Mesh, axis: str = "tp"):
    """fn(hidden, residual, cos, sin, positions) -> (hidden, residual): `decoder_layer` without a KV
    cache (causal attention within the tokens), each device on its shards of `layer` (made by
    `megatron_layer_params`), activations replicated, two psums."""
    tp = axis_size(mesh, axis)
    local = local_config(config, tp)
    # wk / wv already hold max(num_kv_heads, tp) heads (repeated by megatron_layer_params): split them
    specs = param_specs(layer, dataclasses.replace(config, num_kv_heads=max(config.num_kv_heads, tp)), tp, axis)
    ops = TensorParallelOps(axis=axis)

    def run(layer, hidden, residual, cos, sin, positions):
        hidden, residual, _ = decoder_layer(layer, hidden, residual, cos, sin, None, positions, None,
                                            config=local, backend="contiguous", ops=ops)
        return hidden, residual

    sharded = jax.shard_map(run, mesh=mesh, in_specs=(specs, P(), P(), P(), P(), P()), out_specs=(P(), P()))
    return lambda hidden, residual, cos, sin, positions: sharded(layer, hidden, residual, cos, sin, positions)
