"""Attention metadata for a paged KV cache: the device arrays one model step needs.

The model runner builds this from the block manager's host-side state, as numpy arrays, and moves
the whole pytree to the device in one transfer per step; the `paged` attention backends read it.
Token arrays are flat (`[num_tokens]`: the new tokens of every scheduled sequence, one after the
other, padded at the end) and sequences are padded to a bucket, so `jax.jit` sees few shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from paged_attention.buckets import pow2_at_least


@dataclasses.dataclass(frozen=True)
class PagedMetadata:
    slot_mapping: jax.Array  # i32[num_tokens]: cache slot each new token's K/V goes to; -1 = padding
    block_tables: jax.Array  # i32[num_seqs, max_blocks_per_seq]
    context_lens: jax.Array  # i32[num_seqs]: tokens in the cache after this step; 0 = padding row
    query_start_loc: jax.Array  # i32[num_seqs + 1]: sequence s owns tokens [qsl[s], qsl[s+1])
    decode_only: bool = False  # static: every sequence has exactly one new token (decode kernel)
    max_query_len: int | None = None  # static: bound on any sequence's new tokens (a power of two)
    # Split steps (`build_split`): the first `num_prefill_seqs` rows own tokens [0, num_prefill_tokens)
    # (ragged, `query_start_loc` has num_prefill_seqs + 1 entries) and go to the prefill kernel; every
    # later row owns one token, at num_prefill_tokens + its index among them, and goes to the decode
    # kernel. None: one kernel for the whole step.
    num_prefill_tokens: int | None = None
    num_prefill_seqs: int | None = None
    # (pair_seq, pair_query, pair_rows) of `decode_cpu.build_decode_indices` for the decode rows, when
    # the step runs the CPU decode path (backend "paged_cpu"); None otherwise.
    decode_pairs: tuple | None = None
    # The arrays of `prefill_cpu.build_prefill_indices` for the prefill rows, when the step runs the
    # packed CPU prefill (backend "paged_cpu"); None otherwise.
    prefill_pairs: tuple | None = None

    @classmethod
    def build(cls, block_tables: Sequence[Sequence[int]], context_lens: Sequence[int],
              query_lens: Sequence[int], block_size: int, *, num_tokens: int | None = None,
              num_seqs: int | None = None, max_blocks: int | None = None) -> "PagedMetadata":
        """From host lists: each sequence's block table, its context length after this step, and how
        many new tokens it brings (its last `query_len` positions). Pads tokens, sequences and table
        width to the given sizes (defaults: exact)."""
        n = len(block_tables)
        query_lens = np.asarray(query_lens, np.int64)
        num_tokens = int(query_lens.sum()) if num_tokens is None else num_tokens
        num_seqs = n if num_seqs is None else num_seqs
        max_blocks = max(1, max(len(t) for t in block_tables)) if max_blocks is None else max_blocks
        if query_lens.sum() > num_tokens or n > num_seqs:
            raise ValueError(f"{query_lens.sum()} tokens / {n} sequences exceed the padded sizes "
                             f"num_tokens={num_tokens}, num_seqs={num_seqs}")
        tables = np.zeros((num_seqs, max_blocks), np.int32)
        lens = np.zeros(num_seqs, np.int32)
        slots = np.full(num_tokens, -1, np.int32)
        starts = np.zeros(num_seqs + 1, np.int32)
        offset = 0
        for s, (table, context_len, q_len) in enumerate(zip(block_tables, context_lens, query_lens)):
            if len(table) > max_blocks:
                raise ValueError(f"sequence {s} has {len(table)} blocks > max_blocks={max_blocks}")
            tables[s, :len(table)] = table
            lens[s] = context_len
            positions = np.arange(context_len - q_len, context_len)
            table_arr = np.asarray(table, np.int64)
            slots[offset:offset + q_len] = table_arr[positions // block_size] * block_size + positions % block_size
            offset += int(q_len)
            starts[s + 1] = offset
        starts[n + 1:] = offset
        decode_only = bool(n > 0 and np.all(query_lens == 1) and num_tokens == num_seqs)
        longest = int(query_lens.max()) if n else 1
        max_query_len = min(num_tokens, pow2_at_least(longest))  # bucketed: few compiles
        return cls(slots, tables, lens, starts, decode_only, max_query_len)


    @classmethod
    def build_split(cls, block_tables: Sequence[Sequence[int]], context_lens: Sequence[int],
                    query_lens: Sequence[int], block_size: int, *, num_prefill: int, num_prefill_tokens: int,
                    num_prefill_seqs: int, num_decode_seqs: int, max_blocks: int) -> "PagedMetadata":
        """A step mixing prompt chunks and decodes, each part for its own kernel: the first
        `num_prefill` sequences (any query length) are padded to `num_prefill_tokens` tokens and
        `num_prefill_seqs` rows, the rest (one new token each) to `num_decode_seqs` rows."""
        prefill = cls.build(block_tables[:num_prefill], context_lens[:num_prefill], query_lens[:num_prefill],
                            block_size, num_tokens=num_prefill_tokens, num_seqs=num_prefill_seqs,
                            max_blocks=max_blocks)
        tables, lens, slots = [prefill.block_tables], [prefill.context_lens], [prefill.slot_mapping]
        if num_decode_seqs:
            if any(q != 1 for q in query_lens[num_prefill:]):
                raise ValueError("every sequence after the first num_prefill must bring exactly one token")
            decode = cls.build(block_tables[num_prefill:], context_lens[num_prefill:], query_lens[num_prefill:],
                               block_size, num_tokens=num_decode_seqs, num_seqs=num_decode_seqs,
                               max_blocks=max_blocks)
            tables.append(decode.block_tables)
            lens.append(decode.context_lens)
            slots.append(decode.slot_mapping)
        # joined on the host: jnp.concatenate compiles a small program per new shape, which a frozen
        # server must not do
        joined = [np.concatenate(parts) for parts in (slots, tables, lens)]
        return cls(*joined, prefill.query_start_loc, False, prefill.max_query_len, num_prefill_tokens, num_prefill_seqs)

    @property
    def num_pairs(self) -> tuple[int, int]:
        """Lengths of the (decode, prefill) index lists of the XLA-CPU paths (0: none)."""
        return (len(self.decode_pairs[0]) if self.decode_pairs else 0,
                len(self.prefill_pairs[2]) if self.prefill_pairs else 0)


jax.tree_util.register_dataclass(
    PagedMetadata, data_fields=["slot_mapping", "block_tables", "context_lens", "query_start_loc", "decode_pairs",
                 "prefill_pairs"],
    meta_fields=["decode_only", "max_query_len", "num_prefill_tokens", "num_prefill_seqs"])
