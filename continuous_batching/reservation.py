"""Orca-style KV memory: each request reserves one contiguous region, sized at admission, for its
whole life (host-side, JAX-free). The `static` and `request_level` policies run on it.

The cache is the same pool of fixed-size blocks the paged policies use, but a request's blocks are
consecutive (first-fit over free extents), so the attention kernels read one contiguous span per
sequence, exactly what a `[max_len]` slot of a contiguous cache holds, and freed regions fragment
the pool as contiguous allocation does. Reservation rules (vLLM paper, section 6.1):

    max     every request reserves `max_model_len` tokens (FasterTransformer / Orca (Max))
    pow2    the next power of two above prompt + max_tokens (Orca (Pow2))
    oracle  exactly prompt + max_tokens (Orca (Oracle): exact when EOS is ignored, as benchmarks do)

A sequence never outgrows its region, so this manager never needs preemption.
"""

from __future__ import annotations

import bisect
from typing import Sequence as Seq

from paged_attention.block_manager import NoFreeBlocksError

RESERVATIONS = ("max", "pow2", "oracle")


def reservation_tokens(rule: str, prompt_len: int, max_tokens: int, max_model_len: int) -> int:
    """Tokens a request reserves under `rule` (see the module docstring)."""
    needed = prompt_len + max_tokens
    if rule == "max":
        return max_model_len
    if rule == "pow2":
        return min(max_model_len, 1 << max(0, needed - 1).bit_length())
    if rule == "oracle":
        return needed
    raise ValueError(f"reservation must be one of {RESERVATIONS}, got {rule!r}")


class ReservationManager:
    """Contiguous per-sequence regions of a block pool; the subset of `BlockManager`'s interface the
    scheduler uses, with the region size passed in at allocation (`reserve`, in tokens)."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_extents: list[tuple[int, int]] = [(0, num_blocks)]  # (start, length), sorted by start
        self.regions: dict[int, tuple[int, int]] = {}  # seq_id -> (start block, blocks)
        self.lengths: dict[int, int] = {}  # seq_id -> tokens written

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
        if seq_id in self.regions:
            raise ValueError(f"sequence {seq_id} is already allocated")
        if len(token_ids) > reserve:
            raise ValueError(f"{len(token_ids)} tokens exceed the reservation of {reserve}")
        blocks = self._blocks(reserve)
        index = self._first_fit(blocks)
        if index is None:
            raise NoFreeBlocksError(f"no {blocks} contiguous free blocks (largest extent: "
                                    f"{max((n for _, n in self.free_extents), default=0)})")
        start, length = self.free_extents[index]
        if length == blocks:
            del self.free_extents[index]
        else:
            self.free_extents[index] = (start + blocks, length - blocks)
        self.regions[seq_id] = (start, blocks)
        self.lengths[seq_id] = len(token_ids)
        return 0

    def get_block_table(self, seq_id: int) -> list[int]:
        start, blocks = self.regions[seq_id]
        return list(range(start, start + self._blocks(self.lengths[seq_id]))) if blocks else []

    def num_tokens(self, seq_id: int) -> int:
        return self.lengths[seq_id]

    def can_append(self, seq_id: int) -> bool:
        return self.lengths[seq_id] < self.regions[seq_id][1] * self.block_size

    def append_slot(self, seq_id: int, token_id: int) -> tuple[int, list[tuple[int, int]]]:
        """Place one more token in the region; returns (slot, no copies)."""
        if not self.can_append(seq_id):
            raise NoFreeBlocksError(f"sequence {seq_id} outgrew its reservation")
        slot = self.regions[seq_id][0] * self.block_size + self.lengths[seq_id]
        self.lengths[seq_id] += 1
        return slot, []

    def can_swap_out(self, seq_id: int) -> bool:
        return False  # a reservation never runs out, so there is nothing to swap

    def free(self, seq_id: int) -> None:
        """Return the region to the free extents, merging with its neighbours."""
        start, blocks = self.regions.pop(seq_id)
        del self.lengths[seq_id]
        index = bisect.bisect(self.free_extents, (start, blocks))
        self.free_extents.insert(index, (start, blocks))
        merged: list[tuple[int, int]] = []
        for s, n in self.free_extents:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self.free_extents = merged
