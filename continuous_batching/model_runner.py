"""Model runner: turns one scheduled step (which sequences, which new tokens, where their blocks are)
into padded device arrays, runs the model on the paged KV cache, and returns the next tokens.

Shapes are bucketed so `jax.jit` compiles a handful of programs: sequences are padded to
`max_num_seqs`, new tokens to max_num_seqs or a power of two above it, block tables to
`max_blocks_per_seq`.
A step where every sequence brings one token compiles to the decode kernel; any other step (prompt
passes, cached-prefix suffixes, mixed) to the ragged prefill kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import models
from models.llama import forward
from models.static_batch import bucket_pow2
from paged_attention.kv_cache import copy_blocks, init_paged_kv_cache, kv_cache_bytes
from paged_attention.metadata import PagedMetadata


@dataclasses.dataclass(frozen=True)
class SeqStep:
    """One sequence's part of a step: its new tokens are the last `len(new_tokens)` of its context."""

    block_table: list[int]
    context_len: int  # tokens in the cache after this step
    new_tokens: list[int]


@functools.partial(jax.jit, static_argnames=("config", "backend"), donate_argnames=("kv_cache",))
def _greedy_step(params, tokens, positions, kv_cache, metadata, logits_indices, *, config, backend):
    """One model step on pages; returns (i32[num_seqs] argmax tokens, kv_cache)."""
    logits, kv_cache = forward(params, tokens, positions, kv_cache, metadata, config=config,
                               backend=backend, logits_indices=logits_indices)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), kv_cache


def num_compilations() -> int:
    """Programs compiled so far by the runner's jitted step (one per distinct shape)."""
    return _greedy_step._cache_size()


class PagedModelRunner:
    """Owns the paged KV cache of one model and runs greedy steps on it."""

    def __init__(self, model: models.Model, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_blocks_per_seq: int, backend: str = "paged_reference"):
        config = model.config
        self.model, self.backend = model, backend
        self.block_size, self.max_num_seqs, self.max_blocks = block_size, max_num_seqs, max_blocks_per_seq
        self.kv_cache = init_paged_kv_cache(config.num_layers, num_blocks, block_size, config.num_kv_heads,
                                            config.head_dim, model.params["embed"].dtype)
        self.shapes_run: set[tuple[int, bool]] = set()

    @property
    def kv_cache_bytes(self) -> int:
        return kv_cache_bytes(self.kv_cache)

    def num_tokens_bucket(self, num_tokens: int) -> int:
        """Padded token count: exactly max_num_seqs for small steps (so every decode step, one token
        per sequence, has the decode kernel's shape), else the next power of two."""
        if num_tokens <= self.max_num_seqs:
            return self.max_num_seqs
        return bucket_pow2(num_tokens)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Apply copy-on-write copies [(src, dst)] the block manager asked for."""
        if copies:
            src, dst = (jnp.asarray(x, jnp.int32) for x in zip(*copies))
            self.kv_cache = copy_blocks(self.kv_cache, src, dst)

    def step(self, seqs: list[SeqStep]) -> list[int]:
        """Run one step; returns each sequence's next (greedy) token."""
        if not 0 < len(seqs) <= self.max_num_seqs:
            raise ValueError(f"a step takes 1..max_num_seqs={self.max_num_seqs} sequences, got {len(seqs)}")
        query_lens = [len(s.new_tokens) for s in seqs]
        num_tokens = self.num_tokens_bucket(sum(query_lens))
        metadata = PagedMetadata.build([s.block_table for s in seqs], [s.context_len for s in seqs],
                                       query_lens, self.block_size, num_tokens=num_tokens,
                                       num_seqs=self.max_num_seqs, max_blocks=self.max_blocks)
        tokens = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        offset = 0
        for s, q_len in zip(seqs, query_lens):
            tokens[offset:offset + q_len] = s.new_tokens
            positions[offset:offset + q_len] = np.arange(s.context_len - q_len, s.context_len)
            offset += q_len
        last = np.asarray(metadata.query_start_loc)[1:] - 1  # each sequence's last new token
        last = np.maximum(last, 0)  # padding rows: any valid index, result ignored
        self.shapes_run.add((num_tokens, metadata.decode_only))
        next_tokens, self.kv_cache = _greedy_step(
            self.model.params, jnp.asarray(tokens), jnp.asarray(positions), self.kv_cache, metadata,
            jnp.asarray(last, jnp.int32), config=self.model.config, backend=self.backend)
        return np.asarray(next_tokens)[:len(seqs)].tolist()
