"""Contiguous KV memory (host-side, JAX-free): each request reserves one contiguous region, sized at
admission, for its whole life. The `static` (FasterTransformer) and `request_level` (Orca) policies
run on it.

The cache is the same pool of fixed-size blocks the paged policies use, but a request's blocks are
consecutive (first-fit over free extents), so the attention kernels read one contiguous span per
sequence, exactly what a `[max_len]` slot of a contiguous cache holds, and freed regions fragment
the pool as contiguous allocation does. Per-request reservation rules (`request_level`; vLLM paper, section 6.1):

    max     every request reserves `max_model_len` tokens (Orca (Max))
    pow2    prompt + the next power of two >= max_tokens (Orca (Pow2): "if the true output length is
            25, it reserves 32 positions for outputs"), at most `max_model_len`
    oracle  exactly prompt + max_tokens (Orca (Oracle): exact when EOS is ignored, as benchmarks do)

Per-batch reservation (`static`): FasterTransformer sizes its KV cache per `forward` call as
`[batch, max_input_len + max_output_len]`, the input length padded to the batch's longest prompt and
the output to the batch's largest `max_tokens`. So a batch of n requests reserves n rows of
`batch_row_tokens` = longest prompt + largest max_tokens tokens each, every row rounded up to whole
blocks (a row is one member's region and starts on a block boundary, as every region does):

    batch blocks = n * ceil((max prompt_len + max max_tokens) / block_size)

The rows are one contiguous extent (`allocate_batch`), row i for the batch's i-th member. A member
that finishes keeps its row until the last member is freed, as FT's buffer lives until `forward`
returns; its tokens stop counting in `num_real_tokens` (they are never read again) while its blocks
still count in `num_used_blocks`. The row may be longer than `max_model_len` (a short prompt with a
long output next to a long prompt with a short one); no member ever writes past its own
prompt + max_tokens, which the engine keeps within `max_model_len`.

A sequence never outgrows its region, so this manager never needs preemption.
"""

from __future__ import annotations

import bisect
from typing import Sequence as Seq

from paged_attention.block_manager import NoFreeBlocksError, check_appended_tokens
from paged_attention.buckets import pow2_at_least

RESERVATIONS = ("max", "pow2", "oracle")


def reservation_tokens(rule: str, prompt_len: int, max_tokens: int, max_model_len: int) -> int:
    """Tokens a request reserves under `rule` (see the module docstring)."""
    if rule == "max":
        return max_model_len
    if rule == "pow2":
        return min(max_model_len, prompt_len + pow2_at_least(max_tokens))
    if rule == "oracle":
        return prompt_len + max_tokens
    raise ValueError(f"reservation must be one of {RESERVATIONS}, got {rule!r}")


def batch_row_tokens(prompt_lens: Seq[int], max_tokens: Seq[int]) -> int:
    """Tokens of each row of a static batch: its longest prompt + its largest max_tokens (FT)."""
    if not prompt_lens or len(prompt_lens) != len(max_tokens):
        raise ValueError("a batch needs one max_tokens per prompt, and at least one of each")
    return max(prompt_lens) + max(max_tokens)


class ReservationManager:
    """Contiguous per-sequence regions of a block pool; the subset of `BlockManager`'s interface the
    scheduler uses, with the region size passed in at allocation (`reserve`, in tokens), plus whole
    static batches (`allocate_batch`)."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_extents: list[tuple[int, int]] = [(0, num_blocks)]  # (start, length), sorted by start
        self.regions: dict[int, tuple[int, int]] = {}  # seq_id -> (start block, blocks)
        self.lengths: dict[int, int] = {}  # seq_id -> tokens written (live sequences only)
        self.batch_of: dict[int, int] = {}  # seq_id -> its static batch (the batch's first seq_id)
        # batch -> (start block, blocks, member seq_ids, members not yet freed)
        self.batches: dict[int, tuple[int, int, tuple[int, ...], set[int]]] = {}

    @property
    def num_free_blocks(self) -> int:
        return sum(length for _, length in self.free_extents)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_real_tokens(self) -> int:
        return sum(self.lengths.values())

    def _blocks(self, tokens: int) -> int:
        return max(1, -(-tokens // self.block_size))

    def _first_fit(self, blocks: int) -> int | None:
        return next((i for i, (_, length) in enumerate(self.free_extents) if length >= blocks), None)

    def can_allocate(self, token_ids: Seq[int], reserve: int) -> bool:
        return len(token_ids) <= reserve and self._first_fit(self._blocks(reserve)) is not None

    def allocate(self, seq_id: int, token_ids: Seq[int], reserve: int) -> int:
        """Reserve `reserve` tokens of contiguous blocks holding `token_ids`; returns 0 cached tokens."""
        self._check_new([seq_id], [token_ids], reserve)
        start = self._take(self._blocks(reserve))
        self.regions[seq_id] = (start, self._blocks(reserve))
        self.lengths[seq_id] = len(token_ids)
        return 0

    def can_allocate_batch(self, token_ids: Seq[Seq[int]], row_tokens: int) -> bool:
        """Whether a static batch of these members, `row_tokens` per row, fits in one free extent."""
        return (bool(token_ids) and all(len(t) <= row_tokens for t in token_ids)
                and self._first_fit(len(token_ids) * self._blocks(row_tokens)) is not None)

    def allocate_batch(self, seq_ids: Seq[int], token_ids: Seq[Seq[int]], row_tokens: int) -> None:
        """Reserve one contiguous extent of len(seq_ids) rows of `row_tokens` tokens, each rounded up
        to whole blocks; row i is seq_ids[i]'s region, holding token_ids[i]. The extent returns to the
        pool when the last member is freed (see the module docstring)."""
        if not seq_ids or len(seq_ids) != len(token_ids):
            raise ValueError("a batch needs one token list per sequence, and at least one sequence")
        self._check_new(seq_ids, token_ids, row_tokens)
        row = self._blocks(row_tokens)
        start = self._take(len(seq_ids) * row)
        self.batches[seq_ids[0]] = (start, len(seq_ids) * row, tuple(seq_ids), set(seq_ids))
        for i, (seq_id, tokens) in enumerate(zip(seq_ids, token_ids)):
            self.regions[seq_id] = (start + i * row, row)
            self.lengths[seq_id] = len(tokens)
            self.batch_of[seq_id] = seq_ids[0]

    def _check_new(self, seq_ids: Seq[int], token_ids: Seq[Seq[int]], reserve: int) -> None:
        for seq_id, tokens in zip(seq_ids, token_ids):
            if seq_id in self.regions:
                raise ValueError(f"sequence {seq_id} is already allocated")
            if len(tokens) > reserve:
                raise ValueError(f"{len(tokens)} tokens exceed the reservation of {reserve}")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"a sequence appears twice in {list(seq_ids)}")

    def _take(self, blocks: int) -> int:
        """Cut `blocks` consecutive blocks from the first free extent that holds them; their start."""
        index = self._first_fit(blocks)
        if index is None:
            raise NoFreeBlocksError(f"no {blocks} contiguous free blocks (largest extent: "
                                    f"{max((n for _, n in self.free_extents), default=0)})")
        start, length = self.free_extents[index]
        if length == blocks:
            del self.free_extents[index]
        else:
            self.free_extents[index] = (start + blocks, length - blocks)
        return start

    def get_block_table(self, seq_id: int) -> list[int]:
        start, blocks = self.regions[seq_id]
        return list(range(start, start + self._blocks(self.lengths[seq_id]))) if blocks else []

    def num_tokens(self, seq_id: int) -> int:
        return self.lengths[seq_id]

    def can_append(self, seq_id: int) -> bool:
        return self.lengths[seq_id] < self.regions[seq_id][1] * self.block_size

    def append_slot(self, seq_id: int, token_ids: Seq[int]) -> tuple[int, list[tuple[int, int]]]:
        """Place one more token in the region (`token_ids`: the sequence's tokens, that one last; only
        their count is read); returns (slot, no copies)."""
        check_appended_tokens(seq_id, self.lengths[seq_id], token_ids)
        if not self.can_append(seq_id):
            raise NoFreeBlocksError(f"sequence {seq_id} outgrew its reservation")
        slot = self.regions[seq_id][0] * self.block_size + self.lengths[seq_id]
        self.lengths[seq_id] += 1
        return slot, []

    def can_swap_out(self, seq_id: int) -> bool:
        return False  # a reservation never runs out, so there is nothing to swap

    def free(self, seq_id: int) -> None:
        """Return the region to the free extents, merging with its neighbours. A static batch's member
        only stops counting as real tokens; the batch's extent returns with its last member."""
        if seq_id not in self.lengths:
            raise KeyError(f"sequence {seq_id} holds no region")
        del self.lengths[seq_id]
        batch = self.batch_of.get(seq_id)
        if batch is None:
            self._release(*self.regions.pop(seq_id))
            return
        start, blocks, members, live = self.batches[batch]
        live.discard(seq_id)
        if live:
            return
        del self.batches[batch]
        for member in members:
            del self.batch_of[member], self.regions[member]
        self._release(start, blocks)

    def _release(self, start: int, blocks: int) -> None:
        index = bisect.bisect(self.free_extents, (start, blocks))
        self.free_extents.insert(index, (start, blocks))
        merged: list[tuple[int, int]] = []
        for s, n in self.free_extents:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self.free_extents = merged
