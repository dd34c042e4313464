"""Megatron-style tensor parallelism as shardings of an unchanged model's params and KV cache.

Megatron-LM splits each decoder layer so that it needs two all-reduces: the QKV and gate / up
projections are *column-parallel* (each device holds a slice of the output columns: its own heads,
its own slice of the MLP's intermediate units), the attention output and down projections are
*row-parallel* (each device holds the matching slice of the input rows and produces a partial sum,
all-reduced over the devices). The embedding table is *vocab-parallel* (rows split by token id), the
LM head column-parallel over the vocabulary. vLLM, TGI, FasterTransformer and TensorRT-LLM shard the
same way; gpt-fast's `tp.py` is the smallest copy of it.

Here that layout is a PartitionSpec tree shaped like the params (`param_specs`), placed with
`shard_params`; under `jax.jit` XLA's SPMD partitioner (GSPMD) then inserts the collectives
(`tp_layer.py` writes them out by hand with `jax.shard_map`). KV heads are split over "tp" when
their count divides by it; otherwise (SmolLM2's 3 KV heads at tp 2, 4 or 8) the K / V projections
and the KV cache are replicated, which costs each device the whole cache, and XLA keeps the math
exact. An array whose split axis does not divide by the tp degree (SmolLM2's 9 heads at tp 2: 576
columns divide, but a head is cut in two) is still sharded when its length divides; GSPMD moves what
the reshapes need. Quantized leaves (`QuantizedTensor`) shard every array they hold along the same
axis (codes, scales, zero points or minimums all keep the weight's columns last).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from distributed.mesh import axis_size
from models.config import ModelConfig

COLUMN_PARALLEL = ("wq", "wk", "wv", "w_gate", "w_up", "wqkv", "w_gate_up", "lm_head")  # split the last axis
ROW_PARALLEL = ("wo", "w_down", "embed")  # split the first axis (embed: by token id, vocab-parallel)
KV_PROJECTIONS = ("wk", "wv")


def kv_heads_shard(config: ModelConfig, tp: int) -> bool:
    """Whether each tp device can hold its own KV heads (else K / V and the cache are replicated)."""
    return config.num_kv_heads % tp == 0


def _param_name(path) -> str | None:
    """The params-dict key a leaf sits under ("wq", "embed", ...), also inside a QuantizedTensor."""
    names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
    return names[-1] if names else None


def param_specs(params, config: ModelConfig, tp: int, axis: str = "tp"):
    """A PartitionSpec per array leaf of `params`: the Megatron split over mesh axis `axis` of size
    `tp` (module docstring), `P()` (replicated) for norms and for what cannot split evenly."""

    def spec(path, array) -> P:
        name = _param_name(path)
        if name in KV_PROJECTIONS and not kv_heads_shard(config, tp):
            return P()
        if name in COLUMN_PARALLEL:
            dim = array.ndim - 1
        elif name in ROW_PARALLEL:
            dim = 0
        else:
            return P()  # norms
        if array.shape[dim] % tp:
            return P()
        return P(*([None] * dim), axis)

    return jax.tree_util.tree_map_with_path(spec, params)


def kv_cache_spec(config: ModelConfig, tp: int, axis: str = "tp") -> P:
    """The paged cache `[kv_heads, num_blocks, block_size, head_dim]` split by KV head over `axis`,
    or replicated when the heads do not divide."""
    return P(axis) if kv_heads_shard(config, tp) else P()


def param_shardings(params, config: ModelConfig, mesh: Mesh, axis: str = "tp"):
    """A NamedSharding on `mesh` per array leaf of `params`: the Megatron layout (`param_specs`)."""
    specs = param_specs(params, config, axis_size(mesh, axis), axis)
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params, config: ModelConfig, mesh: Mesh, axis: str = "tp"):
    """`params` placed on `mesh` in the Megatron layout (`param_specs`)."""
    return jax.device_put(params, param_shardings(params, config, mesh, axis))


def runner_placement(config: ModelConfig, mesh: Mesh | None, axis: str = "tp") -> dict:
    """The paged model runner's placement arguments for `mesh`: {} without a mesh or a tp axis
    (everything replicated), else `param_sharding`, a function of the params the runner prepares
    (fused or not) giving their Megatron shardings, and the cache's `kv_sharding`."""
    if mesh is None or axis not in mesh.axis_names:
        return {}
    tp = axis_size(mesh, axis)
    return {"param_sharding": lambda params: param_shardings(params, config, mesh, axis),
            "kv_sharding": NamedSharding(mesh, kv_cache_spec(config, tp, axis))}
