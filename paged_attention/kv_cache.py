"""The paged KV cache on the device: layout, slot writes, block copies (copy-on-write) and swapping.

Each layer holds two arrays, K and V, of shape `[num_kv_heads, num_blocks, block_size, head_dim]`
(head-major: the same layout as `k_pages` in jax's bundled GPU paged-attention kernel, so the two
kernels can be timed on identical inputs). A *block* (page) holds `block_size` consecutive tokens of
one sequence; the sequence's block table maps its logical block i to a physical block id. A *slot*
names one token's place in the cache: `slot = block_id * block_size + offset`. The block manager
(host side, no JAX) decides the block ids; this module only moves data.

Slot -1 marks a padding token (the model runner pads the flattened token batch to a bucket size):
its K/V is dropped, never wrapped around to the last slot.

The cache may be stored in FP8 E4M3 (`kv_cache_dtype="fp8_e4m3"`, vLLM's name): a quarter of f32's
bytes, so four times the blocks in the same memory. As vLLM does without calibrated scales, values
are stored unscaled (scale 1.0): E4M3 keeps 3 mantissa bits from 2^-6 to 448 (subnormals down to
2^-9), and a write saturates at +-448 (a plain cast would give NaN). Every reader widens what it
gathers to f32 before the dot. An `int8` cache stores codes in K / V units that the weights were
scaled into (`quantization/kv_int8.py`: calibrated per-head scales folded into wq, wk, wv, wo), so
it too is read by widening.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from quantization.kv_int8 import to_cache_dtype  # saturating FP8, rounded int8 (scales folded into the weights)

LayerCache = tuple[jax.Array, jax.Array]  # (k, v), each [num_kv_heads, num_blocks, block_size, head_dim]
STORAGE_DTYPES = {"fp8_e4m3": jnp.float8_e4m3fn}  # kv_cache_dtype names that are not jnp dtype names


def cache_dtype(kv_cache_dtype: str, model_dtype):
    """The jnp dtype a `kv_cache_dtype` setting stores the cache in ("auto": the model's)."""
    return model_dtype if kv_cache_dtype == "auto" else jnp.dtype(STORAGE_DTYPES.get(kv_cache_dtype, kv_cache_dtype))


def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """Shape of one layer's K (or V) array in the paged layout; the kernels expect exactly this."""
    return (num_kv_heads, num_blocks, block_size, head_dim)


def init_paged_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                        head_dim: int, dtype=jnp.float32) -> list[LayerCache]:
    """Zeroed per-layer (k, v) arrays; a list so each layer's arrays can be donated and updated in place."""
    shape = get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)]


def kv_cache_bytes(cache: list[LayerCache]) -> int:
    """Bytes the cache reserves on the device."""
    return sum(k.nbytes + v.nbytes for k, v in cache)


@jax.jit
def write_kv(layer_cache: LayerCache, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> LayerCache:
    """Scatter this step's keys/values into their slots.

    k, v: f32/bf16[num_tokens, num_kv_heads, head_dim] (token-major, as the projections make them);
    slot_mapping: i32[num_tokens]. Slots outside `[0, num_blocks * block_size)`, -1 (padding) among
    them, are dropped. A pure scatter: works inside a jitted step and under buffer donation
    (`jax.jit(..., donate_argnums=...)` of the caller updates the cache in place).
    """
    k_cache, v_cache = layer_cache
    num_kv_heads, num_blocks, block_size, head_dim = k_cache.shape
    num_slots = num_blocks * block_size
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)  # negative: dropped, not wrapped
    if slots.shape[0] == 1:  # a one-row scatter becomes a dynamic-update-slice that XLA CPU copies the cache around
        slots = jnp.concatenate([slots, jnp.full((1,), num_slots, slots.dtype)])
        k, v = (jnp.concatenate([x, x]) for x in (k, v))

    def scatter(cache, new):
        flat = cache.reshape(num_kv_heads, num_slots, head_dim)  # [kv_heads, slots, head_dim]
        # flat[:, slots] has shape [kv_heads, num_tokens, head_dim]
        flat = flat.at[:, slots].set(to_cache_dtype(new.swapaxes(0, 1), cache.dtype), mode="drop")
        return flat.reshape(cache.shape)

    return scatter(k_cache, k), scatter(v_cache, v)


@jax.jit
def copy_blocks(layer_caches: list[LayerCache], src: jax.Array, dst: jax.Array) -> list[LayerCache]:
    """Copy whole blocks `src[i] -> dst[i]` in every layer (the device half of copy-on-write).

    src, dst: i32[num_copies]; a negative dst (padding) copies nothing. The copies are gathered before
    any is written, so they behave as simultaneous (a block may be both a source and a destination).
    Wrap in `jax.jit(..., donate_argnums=0)` to update the caches in place.
    """
    num_blocks = layer_caches[0][0].shape[1]
    dst = jnp.where(dst < 0, num_blocks, dst)
    src = jnp.clip(src, 0, num_blocks - 1)  # a padding copy's src may be anything: keep the read in bounds

    def copy(cache):  # [kv_heads, num_blocks, block_size, head_dim]
        return cache.at[:, dst].set(cache[:, src], mode="drop")

    return [(copy(k), copy(v)) for k, v in layer_caches]


@jax.jit
def _gather_blocks(layer_caches: list[LayerCache], block_ids: jax.Array) -> list[LayerCache]:
    return [(k[:, block_ids], v[:, block_ids]) for k, v in layer_caches]


def swap_out_blocks(layer_caches: list[LayerCache], gpu_block_ids) -> list[tuple[np.ndarray, np.ndarray]]:
    """Copy the given blocks of every layer to host memory (preemption by swapping).

    gpu_block_ids: i32[n]. Returns, per layer, numpy (k, v) of shape [num_kv_heads, n, block_size,
    head_dim]; the host pool keeps them until `swap_in_blocks` brings them back (to any block ids).
    """
    block_ids = jnp.asarray(gpu_block_ids, jnp.int32)
    return [(np.asarray(k), np.asarray(v)) for k, v in jax.device_get(_gather_blocks(layer_caches, block_ids))]


@jax.jit
def _scatter_blocks(layer_caches, host_arrays, block_ids):
    return [(k.at[:, block_ids].set(hk.astype(k.dtype)), v.at[:, block_ids].set(hv.astype(v.dtype)))
            for (k, v), (hk, hv) in zip(layer_caches, host_arrays)]


def swap_in_blocks(layer_caches: list[LayerCache], host_arrays: list[tuple[np.ndarray, np.ndarray]],
                   gpu_block_ids) -> list[LayerCache]:
    """Write blocks swapped out by `swap_out_blocks` into device blocks `gpu_block_ids` of every layer.

    host_arrays: per layer (k, v) of shape [num_kv_heads, n, block_size, head_dim]; gpu_block_ids: i32[n].
    Returns the updated caches.
    """
    if len(host_arrays) != len(layer_caches):
        raise ValueError(f"host_arrays has {len(host_arrays)} layers, layer_caches {len(layer_caches)}")
    block_ids = jnp.asarray(gpu_block_ids, jnp.int32)
    for hk, _ in host_arrays:
        if hk.shape[1] != block_ids.shape[0]:
            raise ValueError(f"host_arrays hold {hk.shape[1]} blocks but gpu_block_ids has {block_ids.shape[0]}")
    return _scatter_blocks(layer_caches, [(jax.device_put(hk), jax.device_put(hv)) for hk, hv in host_arrays], block_ids)
