"""The host side of a paged attention backend (vLLM's `AttentionMetadataBuilder`): one model step's
scheduled sequences -> its `PagedMetadata`, padded to the step's shape. Numpy only; the runner
moves the result to the device with the rest of the step's inputs.

A step holds its prefill rows (several new tokens each: prompts, chunks, recomputes) first, for the
ragged prefill kernel, and its decode rows (one new token each) after, for the decode kernel. A
backend whose kernels read host-built index lists (`index_lists`: the XLA-CPU paths,
`decode_cpu.build_decode_indices` and `prefill_cpu.build_prefill_indices`) gets them here, so
attention work follows each sequence's own length.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from paged_attention.decode_cpu import CHUNK as DECODE_CHUNK, build_decode_indices
from paged_attention.metadata import PagedMetadata
from paged_attention.prefill_cpu import CHUNK as PREFILL_CHUNK, MIN_CHUNKS as PREFILL_MIN_CHUNKS
from paged_attention.prefill_cpu import build_prefill_indices, max_tiles


@dataclasses.dataclass(frozen=True)
class PagedMetadataBuilder:
    block_size: int
    num_blocks: int  # blocks in the device pool (the index lists address them)
    num_kv_heads: int
    index_lists: bool = False  # add the XLA-CPU paths' index lists

    def build(self, block_tables: Sequence[Sequence[int]], context_lens: Sequence[int],
              query_lens: Sequence[int], *, num_prefill: int, prefill_tokens: int, prefill_seqs: int,
              decode_seqs: int, max_blocks: int, min_decode_pairs: int = 0,
              min_prefill_pairs: int = 0) -> PagedMetadata:
        """Metadata for sequences ordered prefill rows first (`num_prefill` of them), padded to
        `prefill_tokens` tokens and `prefill_seqs` rows for the prefill part (0: a decode-only step),
        `decode_seqs` rows for the decode part and `max_blocks` table columns; index lists (if any)
        at least `min_*_pairs` long. With no sequences at all it is pure padding (compiling a shape)."""
        if prefill_tokens == 0:
            metadata = PagedMetadata.build(block_tables, context_lens, query_lens, self.block_size,
                                           num_tokens=decode_seqs, num_seqs=decode_seqs, max_blocks=max_blocks)
            metadata = dataclasses.replace(metadata, decode_only=True, max_query_len=1)  # also for padding only
        else:
            metadata = PagedMetadata.build_split(
                block_tables, context_lens, query_lens, self.block_size, num_prefill=num_prefill,
                num_prefill_tokens=prefill_tokens, num_prefill_seqs=prefill_seqs, num_decode_seqs=decode_seqs,
                max_blocks=max_blocks)
        if not self.index_lists:
            return metadata
        return self._with_index_lists(metadata, prefill_tokens, prefill_seqs, min_decode_pairs, min_prefill_pairs)

    def _with_index_lists(self, metadata: PagedMetadata, prefill_tokens: int, prefill_seqs: int,
                          min_decode_pairs: int, min_prefill_pairs: int) -> PagedMetadata:
        """Prefill tiles for the first `prefill_seqs` rows, decode page pairs for the rest."""
        tables, lens = metadata.block_tables, metadata.context_lens
        changes = {}
        if prefill_seqs:
            pairs = build_prefill_indices(
                tables[:prefill_seqs], lens[:prefill_seqs], metadata.query_start_loc, prefill_tokens,
                self.num_blocks, self.num_kv_heads, self.block_size,
                num_tiles=max_tiles(prefill_tokens, prefill_seqs),
                min_chunks=max(PREFILL_MIN_CHUNKS, min_prefill_pairs // PREFILL_CHUNK))
            changes["prefill_pairs"] = tuple(pairs)
            changes["max_query_len"] = None  # static, and the packed prefill has no use for it: fewer compiles
        if len(lens) > prefill_seqs:
            pairs = build_decode_indices(tables[prefill_seqs:], lens[prefill_seqs:], self.num_blocks,
                                         self.num_kv_heads, self.block_size,
                                         min_chunks=max(1, min_decode_pairs // DECODE_CHUNK))
            changes["decode_pairs"] = tuple(pairs)
        return dataclasses.replace(metadata, **changes)
