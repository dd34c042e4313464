"""Attention run per device on its own heads (`jax.shard_map`), for a paged KV cache split by KV head.

Under GSPMD alone (`tensor_parallel.py`), the projections split the Megatron way, but the CPU paged
attention kernels read the cache through flat row indices (`kv_head * num_blocks + block`): an index
space that spans the heads, so XLA's partitioner cannot keep the gathered pages on the device that
holds their head, and all-gathers them (every layer, every step: bytes that grow with the
context). Megatron, vLLM and TensorRT-LLM never move the cache: each rank runs attention on its own
heads. `HeadParallelOps` does that: its `attention` (the cache write and the paged attention of one
layer) runs inside `jax.shard_map` over "tp", each device on its slice of q's heads, of k / v's KV
heads and of the cache, with the step's metadata replicated; the result leaves split by head, as
the row-parallel output projection wants it. The index lists are built for the heads one device
holds (`kv_heads_seen`), which is all any device's kernel sees.

It applies when the KV heads divide by tp (`tensor_parallel.kv_heads_shard`); otherwise the cache
is replicated and there is nothing to keep local. `runner_ops` picks it for a runner.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.sharding import Mesh, PartitionSpec as P

from distributed.mesh import axis_size
from distributed.tensor_parallel import kv_heads_shard
from models.config import ModelConfig
from models.ops import Ops, get_ops


@dataclasses.dataclass(frozen=True)
class HeadParallelOps(Ops):
    """The `xla` ops set with each layer's attention on each device's own heads (module docstring)."""

    name: str = "xla-head-parallel"
    mesh: Mesh | None = None
    axis: str = "tp"

    def kv_heads_seen(self, config: ModelConfig) -> int:
        return config.num_kv_heads // axis_size(self.mesh, self.axis)

    def attention(self, q, k, v, layer_cache, positions, metadata, *, backend: str):
        """q [tokens, heads, head_dim], k / v [tokens, kv_heads, head_dim], layer_cache (k, v)
        [kv_heads, num_blocks, block_size, head_dim]: split along heads over `axis`."""
        heads = P(None, self.axis)  # [tokens, heads, head_dim] split by head
        cache = P(self.axis)  # [kv_heads, ...] split by KV head
        attend = jax.shard_map(functools.partial(super().attention, backend=backend), mesh=self.mesh,
                               in_specs=(heads, heads, heads, (cache, cache), P(), P()),
                               out_specs=(heads, (cache, cache)), check_vma=False)
        return attend(q, k, v, layer_cache, positions, metadata)


def runner_ops(config: ModelConfig, mesh: Mesh | None, kernels: "str | Ops", axis: str = "tp") -> "str | Ops":
    """The ops set a runner on `mesh` should use: `HeadParallelOps` for the `xla` set when the KV
    heads split over `axis`; `kernels` unchanged otherwise (other sets keep GSPMD's placement)."""
    tp = axis_size(mesh, axis)
    if tp > 1 and kv_heads_shard(config, tp) and get_ops(kernels) == get_ops("xla"):
        return HeadParallelOps(mesh=mesh, axis=axis)
    return kernels
