"""Attention-backend switch: the one place the model meets a KV-cache layout.

A backend is a function `(q, k, v, layer_cache, positions, metadata) -> (out, layer_cache)` where
q is `[*lead, num_heads, head_dim]`, k and v are `[*lead, kv_heads, head_dim]` (RoPE applied) and
out is `[*lead, num_heads, head_dim]`. The backends and their names: `paged_attention/backend_names.py`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from paged_attention import contiguous, decode_cpu, decode_kernel, kv_cache, prefill_cpu, prefill_kernel


def _no_cache(q, k, v, layer_cache, positions, metadata):
    """Causal attention within the given tokens only (a full forward without any cache)."""
    del layer_cache, metadata
    head_major = (k.swapaxes(1, 2), v.swapaxes(1, 2))  # [batch, kv_heads, tokens, head_dim]
    return contiguous.causal_attention(q, *head_major, positions, positions), None


def _contiguous(q, k, v, layer_cache, positions, metadata):
    """The naive `[batch, max_len]` cache (HF / FasterTransformer style)."""
    del metadata
    if layer_cache is None:
        return _no_cache(q, k, v, None, positions, None)
    return contiguous.contiguous_attention(q, k, v, layer_cache, positions)


def _decode_cpu(q, k_cache, v_cache, block_tables, context_lens, *, pairs):
    if pairs is None:  # metadata built without the pair lists: the dense reference
        return decode_kernel.paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens)
    return decode_cpu.paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, *pairs)


def _prefill_cpu(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, *, max_query_len, pairs):
    if pairs is None:  # metadata built without the tile lists: the jnp reference
        return prefill_kernel.paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, context_lens,
                                                                query_start_loc, max_query_len=max_query_len)
    return prefill_cpu.paged_prefill_attention_cpu(q, k_cache, v_cache, *pairs)


def _paged(q, k, v, layer_cache, positions, metadata, *, use_kernel: bool, cpu: bool = False):
    """A paged cache `[kv_heads, num_blocks, block_size, head_dim]` per layer: write this step's
    K/V into their slots, then attend through the block tables. Tokens are flat: q is
    `[num_tokens, num_heads, head_dim]`. Decode-only steps use the one-query-per-sequence kernel;
    anything else (prefill, chunked prefill, mixed) the ragged prefill kernel."""
    del positions  # positions live in the metadata (context lengths and query offsets)
    layer_cache = kv_cache.write_kv(layer_cache, k, v, metadata.slot_mapping)
    k_cache, v_cache = layer_cache
    if use_kernel:  # Pallas: compiled on a GPU, interpreted elsewhere
        kernel_args = {"interpret": jax.default_backend() != "gpu"}
        decode, prefill = decode_kernel.paged_decode_attention, prefill_kernel.paged_prefill_attention
    else:
        kernel_args = {}
        decode = decode_kernel.paged_decode_attention_reference
        prefill = prefill_kernel.paged_prefill_attention_reference
    if cpu:
        decode = functools.partial(_decode_cpu, pairs=metadata.decode_pairs)
        prefill = functools.partial(_prefill_cpu, pairs=metadata.prefill_pairs)
    if metadata.decode_only:
        out = decode(q, k_cache, v_cache, metadata.block_tables, metadata.context_lens, **kernel_args)
    elif metadata.num_prefill_seqs is None:
        out = prefill(q, k_cache, v_cache, metadata.block_tables, metadata.context_lens,
                      metadata.query_start_loc, max_query_len=metadata.max_query_len, **kernel_args)
    else:  # split step: prompt chunks to the prefill kernel, single tokens to the decode kernel
        num_p, seqs_p = metadata.num_prefill_tokens, metadata.num_prefill_seqs
        out = prefill(q[:num_p], k_cache, v_cache, metadata.block_tables[:seqs_p], metadata.context_lens[:seqs_p],
                      metadata.query_start_loc, max_query_len=metadata.max_query_len, **kernel_args)
        if q.shape[0] > num_p:
            out_decode = decode(q[num_p:], k_cache, v_cache, metadata.block_tables[seqs_p:],
                                metadata.context_lens[seqs_p:], **kernel_args)
            out = jnp.concatenate([out, out_decode])
    return out, layer_cache


BACKENDS: dict[str, Callable[..., tuple[jax.Array, Any]]] = {
    "contiguous": _contiguous,
    "paged": functools.partial(_paged, use_kernel=True),
    "paged_reference": functools.partial(_paged, use_kernel=False),
    # XLA-on-CPU decode and packed prefill (paged_attention/decode_cpu.py, prefill_cpu.py); without the
    # host-built index lists in the metadata, the jnp references
    "paged_cpu": functools.partial(_paged, use_kernel=False, cpu=True),
}


def attend(backend: str, q, k, v, layer_cache, positions, metadata):
    """Dispatch one layer's attention to the named backend."""
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {sorted(BACKENDS)}") from None
    return fn(q, k, v, layer_cache, positions, metadata)
