"""Host offload of weights: ZeRO-Inference / llama.cpp `-ngl` placement for one device.

`offload_shardings(params, num_offloaded)` keeps the last `num_offloaded` decoder layers' weights in
host memory (memory kind "pinned_host": page-locked, so a GPU can DMA from it) and everything else
in device memory; the model brings each offloaded layer in when it runs
(`models/host_offload.py`). llama.cpp's `-ngl N` keeps the first N layers on the GPU, the same
split with num_offloaded = num_layers - N. Device memory then holds the embedding, the resident
layers and the KV cache, and each step reads the offloaded layers across the host link once:
what offload costs is that traffic per step, which batching amortizes (one copy serves every
sequence in the step), as ZeRO-Inference argues for large batches.
"""

from __future__ import annotations

import jax
from jax.sharding import SingleDeviceSharding

HOST = "pinned_host"


def offload_shardings(params: dict, num_offloaded: int, device=None):
    """A sharding per params leaf: host memory for the last `num_offloaded` layers, device memory
    (of `device`, default jax's first) for the rest."""
    num_layers = len(params["layers"])
    if not 0 <= num_offloaded <= num_layers:
        raise ValueError(f"offload_layers must be between 0 and the model's {num_layers} layers, got {num_offloaded}")
    device = device or jax.devices()[0]
    on_device, on_host = SingleDeviceSharding(device), SingleDeviceSharding(device, memory_kind=HOST)
    first_offloaded = num_layers - num_offloaded
    shardings = jax.tree_util.tree_map(lambda _: on_device, params)
    shardings["layers"] = [jax.tree_util.tree_map(lambda _: on_host if i >= first_offloaded else on_device, layer)
                           for i, layer in enumerate(params["layers"])]
    return shardings


def offload_placement(num_offloaded: int, device=None) -> dict:
    """The paged model runner's placement arguments for host offload: params by `offload_shardings`,
    the KV cache in device memory on the same device (committed there like the params, so the step
    compiles once)."""
    device = device or jax.devices()[0]
    return {"param_sharding": lambda params: offload_shardings(params, num_offloaded, device),
            "kv_sharding": SingleDeviceSharding(device)}


def bytes_by_memory(tree) -> dict[str, int]:
    """Bytes of `tree`'s arrays per memory kind ("device", "pinned_host", ...), over all their shards."""
    held: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        kind = leaf.sharding.memory_kind or "device"
        held[kind] = held.get(kind, 0) + sum(shard.data.nbytes for shard in leaf.addressable_shards)
    return held
