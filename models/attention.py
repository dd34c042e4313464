"""Attention-backend switch: the one place the model meets a KV-cache layout.

A backend is a function `(q, k, v, layer_cache, positions, metadata) -> (out, layer_cache)` where
q is `[*lead, num_heads, head_dim]`, k and v are `[*lead, kv_heads, head_dim]` (RoPE applied) and
out is `[*lead, num_heads, head_dim]`. Later issues register the paged backends here.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from paged_attention import contiguous


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


BACKENDS: dict[str, Callable[..., tuple[jax.Array, Any]]] = {
    "contiguous": _contiguous,
}


def attend(backend: str, q, k, v, layer_cache, positions, metadata):
    """Dispatch one layer's attention to the named backend."""
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {sorted(BACKENDS)}") from None
    return fn(q, k, v, layer_cache, positions, metadata)
