"""Host-side bookkeeping for a paged KV cache (vLLM's block manager), in pure Python: no JAX.

The KV cache is a pool of `num_blocks` physical blocks of `block_size` token slots each. A sequence
owns a *block table* (list of block ids); token position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`.

Blocks are shared by reference count: `fork` (parallel sampling, beam search) and prefix-cache hits
share blocks, and the first write into a shared block copies it (copy-on-write). With
`enable_prefix_caching`, every full block is keyed by `hash((parent_block_hash, its token ids))`, so
equal prompt prefixes map to the same physical blocks across requests; a cached block whose last user
finished stays findable until it is evicted, least recently freed first, when free blocks run out.
Swapping moves a sequence's blocks to a CPU pool and back.

The manager keeps no copy of a sequence's tokens, only how many it holds: the caller's sequence
owns them, and passes them in where they matter (`allocate`, and `append_slot`, which hashes a
block it fills under prefix caching; without prefix caching only their count is read).

Every `(src, dst)` copy list returned here (copy-on-write, swap-out, swap-in) must be carried out by
the runner before the next model step, and in the order the calls were made: a block released by
one call may be handed out by the next.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

BlockKey = tuple[int | None, tuple[int, ...]]  # (parent block's hash, this block's token ids)


class NoFreeBlocksError(RuntimeError):
    """Too few free blocks for the request; call the matching `can_*` first."""


class BlockAllocator:
    """A pool of physical blocks: free list, reference counts and a hash -> block prefix cache.

    Each block is in exactly one state: *free* (in `free_ids`, ref count 0, no hash), *used*
    (ref count >= 1, maybe hashed) or *evictable* (ref count 0, hashed, in `evictable`, oldest first;
    still found by `lookup` until `allocate` evicts it).
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block: dict[int, int] = {}
        self.block_key: dict[int, BlockKey] = {}  # hashed blocks only; the key verifies a hit

    @property
    def num_free(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    def allocate(self) -> int:
        """A block with ref count 1: from the free list, else by evicting the LRU cached block."""
        if self.free_ids:
            block = self.free_ids.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.hash_to_block[hash(self.block_key.pop(block))]
        else:
            raise NoFreeBlocksError(f"all {self.num_blocks} blocks are in use")
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:  # only an evictable (cached) block may be revived
            del self.evictable[block]
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"block {block} released more often than it was taken")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self.block_key:
                self.evictable[block] = None  # most recently freed goes last
            else:
                self.free_ids.append(block)

    def lookup(self, key: BlockKey) -> int | None:
        """The cached block holding exactly `key`'s tokens after `key`'s parent, or None."""
        block = self.hash_to_block.get(hash(key))
        return block if block is not None and self.block_key[block] == key else None

    def register(self, block: int, key: BlockKey) -> None:
        """Cache a full block under `key`, unless another block already holds that hash."""
        if hash(key) not in self.hash_to_block and block not in self.block_key:
            self.hash_to_block[hash(key)] = block
            self.block_key[block] = key


def check_appended_tokens(seq_id: int, num_tokens: int, token_ids: Sequence[int]) -> None:
    """`append_slot`'s argument is the sequence's tokens with the new one last: one more than it holds."""
    if len(token_ids) != num_tokens + 1:
        raise ValueError(f"append_slot for sequence {seq_id} of {num_tokens} tokens needs its "
                         f"{num_tokens + 1} token ids (the new one last), got {len(token_ids)}")


def _check_count(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class BlockManager:
    """Per-sequence block tables and token counts over a GPU pool (and an optional CPU swap pool)."""

    def __init__(self, num_blocks: int, block_size: int = 16, num_cpu_blocks: int = 0,
                 enable_prefix_caching: bool = False):
        _check_count("num_blocks", num_blocks, 1)
        _check_count("block_size", block_size, 1)
        _check_count("num_cpu_blocks", num_cpu_blocks, 0)
        if not isinstance(enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {enable_prefix_caching!r}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.gpu = BlockAllocator(num_blocks)
        self.cpu = BlockAllocator(num_cpu_blocks)
        self.block_tables: dict[int, list[int]] = {}  # sequences resident on the GPU
        self.cpu_tables: dict[int, list[int]] = {}  # swapped-out sequences
        self.lengths: dict[int, int] = {}  # tokens of every live sequence, resident or swapped
        self.block_hashes: dict[int, list[int]] = {}  # chain hash of each full block (caching only)
        self.prefix_hits = 0  # prompt blocks served from the cache
        self.prefix_misses = 0  # cacheable prompt blocks (all but the last token's) not served

    # ----- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """GPU blocks that can be handed out: free list plus evictable cached blocks."""
        return self.gpu.num_free

    @property
    def num_free_cpu_blocks(self) -> int:
        return self.cpu.num_free

    @property
    def num_used_blocks(self) -> int:
        """GPU blocks referenced by at least one sequence."""
        return self.gpu.num_blocks - self.gpu.num_free

    @property
    def num_real_tokens(self) -> int:
        """Token slots filled in used GPU blocks, a shared block counted once; utilization is
        num_real_tokens / (num_used_blocks * block_size)."""
        held: dict[int, int] = {}
        for seq_id, table in self.block_tables.items():
            n = self.lengths[seq_id]
            for i, block in enumerate(table):
                held[block] = max(held.get(block, 0), min(self.block_size, n - i * self.block_size))
        return sum(held.values())

    @property
    def hit_rate(self) -> float:
        """Prefix-cache hits / cacheable prompt blocks looked up (0.0 before any lookup)."""
        total = self.prefix_hits + self.prefix_misses
        return self.prefix_hits / total if total else 0.0

    def get_block_table(self, seq_id: int) -> list[int]:
        """A copy of a resident sequence's block table."""
        return list(self.block_tables[seq_id])

    def num_tokens(self, seq_id: int) -> int:
        return self.lengths[seq_id]

    def is_swapped(self, seq_id: int) -> bool:
        return seq_id in self.cpu_tables

    def ref_count(self, block: int) -> int:
        """Number of resident sequences whose table holds GPU block `block`."""
        return self.gpu.ref_counts[block]

    def get_slot(self, seq_id: int, position: int) -> int:
        """Physical slot of token `position` of a resident sequence."""
        if not 0 <= position < self.lengths[seq_id]:
            raise IndexError(f"position {position} outside sequence {seq_id} of {self.lengths[seq_id]} tokens")
        block = self.block_tables[seq_id][position // self.block_size]
        return block * self.block_size + position % self.block_size

    # ----- prompt allocation -----------------------------------------------------------------------
    def _num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _full_block_keys(self, token_ids: Sequence[int], parent: int | None = None) -> list[BlockKey]:
        keys = []
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            keys.append((parent, tuple(token_ids[start:start + self.block_size])))
            parent = hash(keys[-1])
        return keys

    def _plan(self, token_ids: Sequence[int]) -> tuple[list[BlockKey], list[int], int]:
        """(keys of the prompt's full blocks, cached blocks holding its leading ones, free blocks
        the prompt needs). Hits stop one token short of the prompt: the last token is computed."""
        keys, hits = (self._full_block_keys(token_ids) if self.enable_prefix_caching else []), []
        for key in keys[:(len(token_ids) - 1) // self.block_size]:
            block = self.gpu.lookup(key)
            if block is None:
                break
            hits.append(block)
        shared = sum(1 for block in hits if self.gpu.ref_counts[block] > 0)  # reviving one costs a free block
        return keys, hits, self._num_blocks(len(token_ids)) - shared

    def can_allocate(self, num_tokens_or_token_ids: int | Sequence[int]) -> bool:
        """Whether a prompt fits now. Given token ids, cache hits on in-use blocks need no new block;
        given a count, the answer assumes no hits."""
        if isinstance(num_tokens_or_token_ids, int):
            return self._num_blocks(num_tokens_or_token_ids) <= self.gpu.num_free
        return self._plan(num_tokens_or_token_ids)[2] <= self.gpu.num_free

    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Reserve blocks for a new sequence's prompt; return how many leading prompt tokens are
        already cached (a multiple of block_size, < len(token_ids); 0 without prefix caching).
        Raises NoFreeBlocksError, with nothing changed, when the prompt does not fit."""
        if seq_id in self.lengths:
            raise ValueError(f"sequence {seq_id} is already allocated")
        if len(token_ids) == 0:
            raise ValueError("token_ids must not be empty")
        keys, hits, needed = self._plan(token_ids)
        if needed > self.gpu.num_free:
            raise NoFreeBlocksError(f"sequence {seq_id} needs {needed} free blocks, "
                                    f"{self.gpu.num_free} free")
        table = []
        for block in hits:  # revive or share first, so the new allocations cannot evict them
            self.gpu.incref(block)
            table.append(block)
        for i in range(len(hits), self._num_blocks(len(token_ids))):
            table.append(self.gpu.allocate())
            if i < len(keys):  # a full prompt block: this prompt's prefill writes its KV
                self.gpu.register(table[-1], keys[i])
        if self.enable_prefix_caching:
            self.prefix_hits += len(hits)
            self.prefix_misses += (len(token_ids) - 1) // self.block_size - len(hits)
            self.block_hashes[seq_id] = [hash(key) for key in keys]
        self.block_tables[seq_id] = table
        self.lengths[seq_id] = len(token_ids)
        return len(hits) * self.block_size

    # ----- decoding --------------------------------------------------------------------------------
    def can_append(self, seq_id: int) -> bool:
        """Whether `append_slot` can run: it needs one free block when the last block is full
        (a new block) or shared and partly filled (copy-on-write)."""
        table, n = self.block_tables[seq_id], self.lengths[seq_id]
        needs_block = n % self.block_size == 0 or self.gpu.ref_counts[table[-1]] > 1
        return not needs_block or self.gpu.num_free >= 1

    def append_slot(self, seq_id: int, token_ids: Sequence[int]) -> tuple[int, list[tuple[int, int]]]:
        """Add one token to a resident sequence whose tokens, that one last, are `token_ids`; return
        its slot and the (src, dst) block copies to do before the step writes it. Only the written
        (last) block is ever copied."""
        table, position, copies = self.block_tables[seq_id], self.lengths[seq_id], []
        check_appended_tokens(seq_id, position, token_ids)
        if position % self.block_size == 0:  # last block full (maybe shared or cached): a new one
            table.append(self.gpu.allocate())
        elif self.gpu.ref_counts[table[-1]] > 1:  # partly filled and shared: copy on write
            new = self.gpu.allocate()
            copies.append((table[-1], new))
            self.gpu.decref(table[-1])  # was > 1, so it stays with its other owners
            table[-1] = new
        self.lengths[seq_id] = position + 1
        if self.enable_prefix_caching and (position + 1) % self.block_size == 0:
            hashes = self.block_hashes[seq_id]  # the block just filled is ours alone (ref count 1)
            key = self._full_block_keys(token_ids[-self.block_size:], hashes[-1] if hashes else None)[0]
            hashes.append(hash(key))
            self.gpu.register(table[-1], key)
        return table[position // self.block_size] * self.block_size + position % self.block_size, copies

    def fork(self, parent_id: int, child_id: int) -> None:
        """Make `child_id` share every block of resident `parent_id` (ref counts + 1)."""
        if child_id in self.lengths:
            raise ValueError(f"sequence {child_id} is already allocated")
        table = self.block_tables[parent_id]
        for block in table:
            self.gpu.incref(block)
        self.block_tables[child_id] = list(table)
        self.lengths[child_id] = self.lengths[parent_id]
        if self.enable_prefix_caching:
            self.block_hashes[child_id] = list(self.block_hashes[parent_id])

    def free(self, seq_id: int) -> None:
        """Release a finished (or aborted) sequence, resident or swapped out. Blocks are released
        last first, so under prefix caching a prompt's tail is evicted before its shared head."""
        if seq_id in self.cpu_tables:
            for block in reversed(self.cpu_tables.pop(seq_id)):
                self.cpu.decref(block)
        else:
            for block in reversed(self.block_tables.pop(seq_id)):
                self.gpu.decref(block)
        del self.lengths[seq_id]
        self.block_hashes.pop(seq_id, None)

    # ----- swapping --------------------------------------------------------------------------------
    # A group of sequences (an int or a list of ints) moves together: a block shared inside the group
    # is copied once and stays shared. Sharing with sequences outside the group is not kept: each
    # side gets its own copy (correct, costs memory), and swap-in never re-merges with cached blocks.
    @staticmethod
    def _group(seq_ids: int | Iterable[int]) -> list[int]:
        return [seq_ids] if isinstance(seq_ids, int) else list(seq_ids)

    def can_swap_out(self, seq_ids: int | Iterable[int]) -> bool:
        """Whether the CPU pool has a block for each distinct GPU block of the group."""
        blocks = {b for seq_id in self._group(seq_ids) for b in self.block_tables[seq_id]}
        return len(blocks) <= self.cpu.num_free

    def swap_out(self, seq_ids: int | Iterable[int]) -> list[tuple[int, int]]:
        """Move resident sequences to the CPU pool; return the (gpu_block, cpu_block) copies.
        Their GPU blocks are released (a block other sequences still hold stays theirs)."""
        return self._move(self._group(seq_ids), self.block_tables, self.cpu_tables, self.gpu, self.cpu)

    def can_swap_in(self, seq_ids: int | Iterable[int]) -> bool:
        """Whether the GPU pool has a block for each distinct CPU block of the group."""
        blocks = {b for seq_id in self._group(seq_ids) for b in self.cpu_tables[seq_id]}
        return len(blocks) <= self.gpu.num_free

    def swap_in(self, seq_ids: int | Iterable[int]) -> list[tuple[int, int]]:
        """Bring swapped-out sequences back; return the (cpu_block, gpu_block) copies."""
        return self._move(self._group(seq_ids), self.cpu_tables, self.block_tables, self.cpu, self.gpu)

    def _move(self, group: list[int], src_tables: dict[int, list[int]], dst_tables: dict[int, list[int]],
              src: BlockAllocator, dst: BlockAllocator) -> list[tuple[int, int]]:
        if len(set(group)) != len(group):
            raise ValueError(f"a sequence is listed twice in {group}")
        tables = [src_tables[seq_id] for seq_id in group]  # KeyError before any change
        needed = len({b for table in tables for b in table})
        if needed > dst.num_free:
            raise NoFreeBlocksError(f"moving {group} needs {needed} free blocks, {dst.num_free} free")
        mapping: dict[int, int] = {}  # src block -> its one copy in the destination pool
        for seq_id, table in zip(group, tables):
            for block in table:
                if block in mapping:
                    dst.incref(mapping[block])
                else:
                    mapping[block] = dst.allocate()
            dst_tables[seq_id] = [mapping[block] for block in table]
            del src_tables[seq_id]
            for block in reversed(table):
                src.decref(block)
        return list(mapping.items())
