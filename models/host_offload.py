"""Weights kept in host memory, brought to the device when their layer runs (ZeRO-Inference's
weight offload, llama.cpp's layers beyond `-ngl`).

A params leaf placed with memory kind "pinned_host" (`distributed/offload.py` places whole layers
so) stays in host memory between steps; `decoder_layer` passes its layer through `to_device`, which
copies each host-resident leaf to device memory inside the step program. jax records the memory
space in the traced type, so the program itself knows which layers to fetch, and XLA schedules the
copies: on a GPU, as asynchronous host-to-device transfers it can overlap with the previous layers'
compute; on CPU, host and device memory are the same RAM and a copy is a memcpy.
"""

from __future__ import annotations

import jax


def in_host_memory(x) -> bool:
    """Whether array (or tracer) `x` lives in host memory (memory kind pinned_host / unpinned_host)."""
    return getattr(jax.typeof(x), "memory_space", None) == jax.memory.Space.Host


def to_device(tree):
    """`tree` with every leaf in host memory copied to device memory (others as they are)."""
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, jax.memory.Space.Device) if in_host_memory(x) else x,
                                  tree)
