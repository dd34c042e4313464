"""Model runner: turns one scheduled step (which sequences, which new tokens, where their blocks are)
into padded device arrays, runs the model on the paged KV cache, and samples each sequence's next
token on device (`continuous_batching.sampler`).

Shapes are bucketed so `jax.jit` compiles a bounded number of programs: sequences are padded to a
power of two (at least `MIN_SEQ_BUCKET`), new tokens to the sequence bucket or a power of two above
it, block tables to a power of two blocks (at least `MIN_BLOCK_BUCKET`, at most
`max_blocks_per_seq`), so attention reads about as many slots as the longest sequence holds.
A step where every sequence brings one token compiles to the decode kernel; any other step (prompt
passes, chunks, cached-prefix suffixes, mixed) to the ragged prefill kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import models
from continuous_batching.sampler import SamplerFlags, build_inputs, sample_tokens
from continuous_batching.sampling_params import SamplingParams
from models.llama import forward
from models.static_batch import bucket_pow2
from paged_attention.kv_cache import copy_blocks, init_paged_kv_cache, kv_cache_bytes
from paged_attention.metadata import PagedMetadata

MIN_SEQ_BUCKET = 4
MIN_BLOCK_BUCKET = 8
GREEDY = SamplingParams(temperature=0)


@dataclasses.dataclass(frozen=True)
class SeqStep:
    """One sequence's part of a step: its new tokens are the last `len(new_tokens)` of its context.
    The sampling fields matter only for a sequence whose chunk ends its known tokens."""

    block_table: list[int]
    context_len: int  # tokens in the cache after this step
    new_tokens: list[int]
    params: SamplingParams = GREEDY
    key: np.ndarray | None = None  # u32[2] request PRNG key (sampler.request_key); None: zeros
    num_generated: int = 0  # tokens the request has generated (folded into its key)
    history: tuple[list[int], list[int]] = ((), ())  # (prompt, output) tokens, for penalties


@dataclasses.dataclass(frozen=True)
class StepResult:
    tokens: list[int]  # each sequence's sampled next token
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None  # (sampled lp, top-20) per sequence


@functools.partial(jax.jit, static_argnames=("config", "backend", "flags"), donate_argnames=("kv_cache",))
def _model_step(params, tokens, positions, kv_cache, metadata, logits_indices, sampler_inputs, *,
                config, backend, flags):
    """One model step on pages, then sampling; returns (i32[num_seqs] tokens, logprobs, kv_cache)."""
    logits, kv_cache = forward(params, tokens, positions, kv_cache, metadata, config=config,
                               backend=backend, logits_indices=logits_indices)
    next_tokens, logprobs = sample_tokens(logits, sampler_inputs, flags)
    return next_tokens, logprobs, kv_cache


def num_compilations() -> int:
    """Programs compiled so far by the runner's jitted step (one per distinct shape and flags)."""
    return _model_step._cache_size()


class PagedModelRunner:
    """Owns the paged KV cache of one model and runs steps on it."""

    def __init__(self, model: models.Model, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_blocks_per_seq: int, backend: str = "paged_reference"):
        config = model.config
        self.model, self.backend = model, backend
        self.block_size, self.max_num_seqs, self.max_blocks = block_size, max_num_seqs, max_blocks_per_seq
        self.kv_cache = init_paged_kv_cache(config.num_layers, num_blocks, block_size, config.num_kv_heads,
                                            config.head_dim, model.params["embed"].dtype)
        self.shapes_run: set[tuple[int, int, int, bool]] = set()  # (tokens, seqs, blocks, decode)

    @property
    def kv_cache_bytes(self) -> int:
        return kv_cache_bytes(self.kv_cache)

    def seq_bucket(self, num_seqs: int) -> int:
        return max(MIN_SEQ_BUCKET, bucket_pow2(num_seqs))

    def num_tokens_bucket(self, num_tokens: int, num_seqs: int) -> int:
        """Padded token count: the sequence bucket when every sequence brings one token (so a decode
        step has the decode kernel's shape), else the next power of two at or above it."""
        return max(self.seq_bucket(num_seqs), bucket_pow2(num_tokens))

    def blocks_bucket(self, num_blocks: int) -> int:
        return min(self.max_blocks, max(MIN_BLOCK_BUCKET, bucket_pow2(num_blocks)))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Apply copy-on-write copies [(src, dst)] the block manager asked for."""
        if copies:
            src, dst = (jnp.asarray(x, jnp.int32) for x in zip(*copies))
            self.kv_cache = copy_blocks(self.kv_cache, src, dst)

    def step(self, seqs: list[SeqStep]) -> StepResult:
        """Run one step; returns each sequence's next token (and log-probs if any row asks)."""
        if not 0 < len(seqs) <= self.max_num_seqs:
            raise ValueError(f"a step takes 1..max_num_seqs={self.max_num_seqs} sequences, got {len(seqs)}")
        query_lens = [len(s.new_tokens) for s in seqs]
        num_seqs = self.seq_bucket(len(seqs))
        num_tokens = self.num_tokens_bucket(sum(query_lens), len(seqs))
        max_blocks = self.blocks_bucket(max(len(s.block_table) for s in seqs))
        metadata = PagedMetadata.build([s.block_table for s in seqs], [s.context_len for s in seqs],
                                       query_lens, self.block_size, num_tokens=num_tokens,
                                       num_seqs=num_seqs, max_blocks=max_blocks)
        tokens = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        offset = 0
        for s, q_len in zip(seqs, query_lens):
            tokens[offset:offset + q_len] = s.new_tokens
            positions[offset:offset + q_len] = np.arange(s.context_len - q_len, s.context_len)
            offset += q_len
        last = np.asarray(metadata.query_start_loc)[1:] - 1  # each sequence's last new token
        last = np.maximum(last, 0)  # padding rows: any valid index, result ignored
        params = [s.params for s in seqs]
        flags = SamplerFlags.for_params(params)
        sampler_inputs = build_inputs(
            params, [np.zeros(2, np.uint32) if s.key is None else s.key for s in seqs],
            [s.num_generated for s in seqs],
            [(list(s.history[0]), list(s.history[1])) for s in seqs] if flags.penalties else None, num_seqs)
        self.shapes_run.add((num_tokens, num_seqs, max_blocks, metadata.decode_only))
        next_tokens, logprobs, self.kv_cache = _model_step(
            self.model.params, jnp.asarray(tokens), jnp.asarray(positions), self.kv_cache, metadata,
            jnp.asarray(last, jnp.int32), sampler_inputs, config=self.model.config, backend=self.backend,
            flags=flags)
        return StepResult(np.asarray(next_tokens)[:len(seqs)].tolist(),
                          None if logprobs is None else _host_logprobs(logprobs, len(seqs)))


def _host_logprobs(logprobs, num_seqs: int) -> list[tuple[float, list[tuple[int, float]]]]:
    chosen, top_logp, top_ids = (np.asarray(x)[:num_seqs] for x in logprobs)
    return [(float(c), list(zip(ids.tolist(), lp.tolist()))) for c, lp, ids in zip(chosen, top_logp, top_ids)]
