"""Attention backends: the one place the model meets a KV-cache layout.

A backend is an object with a name. Calling it, `backend(q, k, v, layer_cache, positions, metadata)
-> (out, layer_cache)`, runs one layer's attention on the device: q is `[*lead, num_heads,
head_dim]`, k and v are `[*lead, kv_heads, head_dim]` (RoPE applied), out is `[*lead, num_heads,
head_dim]`. A paged backend also has a host side, `metadata_builder(block_size, num_blocks,
num_kv_heads)`, which builds each step's `PagedMetadata` the way its kernels read it (vLLM's
`AttentionBackend` / `AttentionMetadataBuilder` pair). Names and what they mean:
`paged_attention/backend_names.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from paged_attention import contiguous, decode_cpu, decode_kernel, kv_cache, prefill_cpu, prefill_kernel
from paged_attention.metadata import PagedMetadata
from paged_attention.metadata_builder import PagedMetadataBuilder


@dataclasses.dataclass(frozen=True)
class ContiguousBackend:
    """The naive `[batch, kv_heads, max_len, head_dim]` cache (HF / FasterTransformer style); with no
    cache, causal attention within the given tokens only (a full forward)."""

    name: str = "contiguous"

    def __call__(self, q, k, v, layer_cache, positions, metadata):
        del metadata
        if layer_cache is None:
            head_major = (k.swapaxes(1, 2), v.swapaxes(1, 2))  # [batch, kv_heads, tokens, head_dim]
            return contiguous.causal_attention(q, *head_major, positions, positions), None
        return contiguous.contiguous_attention(q, k, v, layer_cache, positions)


# Paged kernels behind one signature: (q, k_cache, v_cache, block_tables, context_lens, metadata) -> out
def _interpret() -> bool:
    return jax.default_backend() != "gpu"  # Pallas: compiled on a GPU, interpreted elsewhere


def _index_lists(metadata: PagedMetadata, field: str) -> tuple:
    lists = getattr(metadata, field)
    if lists is None:
        raise ValueError(f"the paged_cpu backend reads host-built index lists, but metadata.{field} is None: "
                         "build the step's metadata with the backend's metadata_builder(...)")
    return lists


def _decode_pallas(q, k_cache, v_cache, tables, lens, metadata):
    return decode_kernel.paged_decode_attention(q, k_cache, v_cache, tables, lens, interpret=_interpret())


def _decode_reference(q, k_cache, v_cache, tables, lens, metadata):
    return decode_kernel.paged_decode_attention_reference(q, k_cache, v_cache, tables, lens)


def _decode_cpu(q, k_cache, v_cache, tables, lens, metadata):
    return decode_cpu.paged_decode_attention_cpu(q, k_cache, v_cache, tables, lens,
                                                 *_index_lists(metadata, "decode_pairs"))


def _prefill_pallas(q, k_cache, v_cache, tables, lens, metadata):
    return prefill_kernel.paged_prefill_attention(q, k_cache, v_cache, tables, lens, metadata.query_start_loc,
                                                  max_query_len=metadata.max_query_len, interpret=_interpret())


def _prefill_reference(q, k_cache, v_cache, tables, lens, metadata):
    return prefill_kernel.paged_prefill_attention_reference(q, k_cache, v_cache, tables, lens,
                                                            metadata.query_start_loc,
                                                            max_query_len=metadata.max_query_len)


def _prefill_cpu(q, k_cache, v_cache, tables, lens, metadata):
    return prefill_cpu.paged_prefill_attention_cpu(q, k_cache, v_cache, *_index_lists(metadata, "prefill_pairs"))


@dataclasses.dataclass(frozen=True)
class PagedBackend:
    """A paged cache `[kv_heads, num_blocks, block_size, head_dim]` per layer, read through one decode
    and one prefill implementation. A call writes this step's K/V into their slots, then attends
    through the block tables; tokens are flat (q is `[num_tokens, num_heads, head_dim]`).
    Decode-only steps use the one-query-per-sequence kernel; a split step (`build_split`) sends its
    prompt chunks to the ragged prefill kernel and its single tokens to the decode kernel; any other
    step goes to the prefill kernel whole."""

    name: str
    decode: Callable
    prefill: Callable
    index_lists: bool = False  # its kernels read host-built index lists (the metadata builder adds them)

    def metadata_builder(self, block_size: int, num_blocks: int, num_kv_heads: int) -> PagedMetadataBuilder:
        return PagedMetadataBuilder(block_size, num_blocks, num_kv_heads, self.index_lists)

    def __call__(self, q, k, v, layer_cache, positions, metadata: PagedMetadata):
        del positions  # positions live in the metadata (context lengths and query offsets)
        layer_cache = kv_cache.write_kv(layer_cache, k, v, metadata.slot_mapping)
        return self.attend_cached(q, layer_cache, metadata), layer_cache

    def attend_cached(self, q, layer_cache, metadata: PagedMetadata) -> jax.Array:
        """Attention of q through the block tables over a cache that already holds this step's K/V
        (written by `__call__`, or by a kernel that fuses the write, `kernel_fusion.qkv_rope`)."""
        k_cache, v_cache = layer_cache
        tables, lens = metadata.block_tables, metadata.context_lens
        if metadata.decode_only:
            return self.decode(q, k_cache, v_cache, tables, lens, metadata)
        if metadata.num_prefill_seqs is None:
            return self.prefill(q, k_cache, v_cache, tables, lens, metadata)
        num_p, seqs_p = metadata.num_prefill_tokens, metadata.num_prefill_seqs
        out = self.prefill(q[:num_p], k_cache, v_cache, tables[:seqs_p], lens[:seqs_p], metadata)
        if q.shape[0] > num_p:
            out_decode = self.decode(q[num_p:], k_cache, v_cache, tables[seqs_p:], lens[seqs_p:], metadata)
            out = jnp.concatenate([out, out_decode])
        return out


BACKENDS: dict[str, ContiguousBackend | PagedBackend] = {b.name: b for b in (
    ContiguousBackend(),
    PagedBackend("paged", _decode_pallas, _prefill_pallas),
    PagedBackend("paged_reference", _decode_reference, _prefill_reference),
    PagedBackend("paged_cpu", _decode_cpu, _prefill_cpu, index_lists=True),  # decode_cpu.py, prefill_cpu.py
)}


def get_backend(name: str) -> ContiguousBackend | PagedBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; allowed: {sorted(BACKENDS)}") from None


def paged_backend(name: str) -> PagedBackend:
    """The paged backend named `name` (what the engine's runner needs)."""
    backend = get_backend(name)
    if not isinstance(backend, PagedBackend):
        raise ValueError(f"backend {name!r} has no paged KV cache; allowed: "
                         f"{sorted(n for n, b in BACKENDS.items() if isinstance(b, PagedBackend))}")
    return backend
