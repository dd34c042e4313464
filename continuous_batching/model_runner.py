"""Model runner: turns one scheduled step (which sequences, which new tokens, where their blocks are)
into padded device arrays, runs the model on the paged KV cache, and samples each sequence's next
token on device (`continuous_batching.sampler`).

A step is split as vLLM splits it: sequences bringing several tokens (prompts, chunks, recomputes)
go first, to the ragged prefill kernel; sequences bringing one token (decodes) after, to the decode
kernel, in the same jitted model step. On the `paged_cpu` backend the host also builds the index
lists of the XLA-CPU paths (`decode_cpu`'s page pairs, `prefill_cpu`'s query tiles), so attention
work follows each sequence's own length. Shapes are bucketed so `jax.jit` compiles a bounded number
of programs: prefill tokens to 2 sizes per octave (at least `MIN_PREFILL_TOKENS`; padding costs
GEMM work), prefill rows to a power of two, decode rows to a power of two (at least
`MIN_SEQ_BUCKET`), block tables to a power of two blocks (at least `MIN_BLOCK_BUCKET`, at most
`max_blocks_per_seq`). Mixing a long prompt with many decodes thus costs prompt x context plus
decodes x context, not (prompt x decodes) x context.
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
from paged_attention.decode_cpu import bucket_size, build_decode_indices
from paged_attention.kv_cache import copy_blocks, init_paged_kv_cache, kv_cache_bytes
from paged_attention.metadata import PagedMetadata
from paged_attention.prefill_cpu import build_prefill_indices, max_tiles

MIN_SEQ_BUCKET = 4
MIN_BLOCK_BUCKET = 8
MIN_PREFILL_TOKENS = 16
GREEDY = SamplingParams(temperature=0)


@dataclasses.dataclass(frozen=True)
class SeqStep:
    """One sequence's part of a step: its new tokens are the last `len(new_tokens)` of its context.
    The sampling fields matter only for a sequence whose chunk ends its known tokens."""

    block_table: list[int]
    context_len: int  # tokens in the cache after this step
    new_tokens: list[int]
    params: SamplingParams = GREEDY
    key: np.ndarray | None = None  # u32[2] request PRNG key (models.sampling.request_key); None: zeros
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
                 max_blocks_per_seq: int, backend: str = "paged_cpu"):
        config = model.config
        self.model, self.backend = model, backend
        self.block_size, self.max_num_seqs, self.max_blocks = block_size, max_num_seqs, max_blocks_per_seq
        self.kv_cache = init_paged_kv_cache(config.num_layers, num_blocks, block_size, config.num_kv_heads,
                                            config.head_dim, model.params["embed"].dtype)
        # (prefill tokens, prefill rows, decode rows, blocks, decode page pairs, prefill tile pairs)
        self.shapes_run: set[tuple[int, ...]] = set()

    @property
    def kv_cache_bytes(self) -> int:
        return kv_cache_bytes(self.kv_cache)

    def seq_bucket(self, num_seqs: int) -> int:
        return max(MIN_SEQ_BUCKET, bucket_pow2(num_seqs))

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
        # Sequences with several new tokens first (prefill kernel), single tokens after (decode kernel).
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].new_tokens) == 1)
        ordered = [seqs[i] for i in order]
        query_lens = [len(s.new_tokens) for s in ordered]
        num_prefill = sum(q > 1 for q in query_lens)
        max_blocks = self.blocks_bucket(max(len(s.block_table) for s in seqs))
        tables, lens = [s.block_table for s in ordered], [s.context_len for s in ordered]
        if num_prefill == 0:
            num_prefill_tokens = num_prefill_seqs = 0
            num_decode_seqs = self.seq_bucket(len(seqs))
            metadata = PagedMetadata.build(tables, lens, query_lens, self.block_size, num_tokens=num_decode_seqs,
                                           num_seqs=num_decode_seqs, max_blocks=max_blocks)
        else:
            num_prefill_tokens = bucket_size(sum(query_lens[:num_prefill]), MIN_PREFILL_TOKENS)
            num_prefill_seqs = bucket_pow2(num_prefill)
            num_decode = len(seqs) - num_prefill
            num_decode_seqs = self.seq_bucket(num_decode) if num_decode else 0
            metadata = PagedMetadata.build_split(
                tables, lens, query_lens, self.block_size, num_prefill=num_prefill,
                num_prefill_tokens=num_prefill_tokens, num_prefill_seqs=num_prefill_seqs,
                num_decode_seqs=num_decode_seqs, max_blocks=max_blocks)
        if self.backend == "paged_cpu":
            metadata = self._with_cpu_index_lists(metadata, num_prefill_tokens, num_prefill_seqs)
        num_tokens = num_prefill_tokens + num_decode_seqs
        num_rows = num_prefill_seqs + num_decode_seqs
        # row of each ordered sequence, and the flat index of its first new token
        rows = list(range(num_prefill)) + list(range(num_prefill_seqs, num_prefill_seqs + len(seqs) - num_prefill))
        starts = np.concatenate([[0], np.cumsum(query_lens[:num_prefill])]).astype(int).tolist()[:num_prefill]
        starts += list(range(num_prefill_tokens, num_prefill_tokens + len(seqs) - num_prefill))
        tokens = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        last = np.zeros(num_rows, np.int32)  # each row's last new token; padding rows: 0 (ignored)
        row_steps: list[SeqStep | None] = [None] * num_rows
        for s, q_len, row, start in zip(ordered, query_lens, rows, starts):
            tokens[start:start + q_len] = s.new_tokens
            positions[start:start + q_len] = np.arange(s.context_len - q_len, s.context_len)
            last[row] = start + q_len - 1
            row_steps[row] = s
        flags = SamplerFlags.for_params([s.params for s in seqs])
        pad = SeqStep([], 0, [])
        row_steps = [pad if r is None else r for r in row_steps]
        sampler_inputs = build_inputs(
            [r.params for r in row_steps], [np.zeros(2, np.uint32) if r.key is None else r.key for r in row_steps],
            [r.num_generated for r in row_steps],
            [(list(r.history[0]), list(r.history[1])) for r in row_steps] if flags.penalties else None, num_rows)
        pair_counts = (len(metadata.decode_pairs[0]) if metadata.decode_pairs else 0,
                       len(metadata.prefill_pairs[2]) if metadata.prefill_pairs else 0)
        self.shapes_run.add((num_prefill_tokens, num_prefill_seqs, num_decode_seqs, max_blocks) + pair_counts)
        next_tokens, logprobs, self.kv_cache = _model_step(
            self.model.params, jnp.asarray(tokens), jnp.asarray(positions), self.kv_cache, metadata,
            jnp.asarray(last), sampler_inputs, config=self.model.config, backend=self.backend, flags=flags)
        row_of = {i: row for i, row in zip(order, rows)}  # original index -> row
        back = [row_of[i] for i in range(len(seqs))]
        next_tokens = np.asarray(next_tokens)
        host_lp = None if logprobs is None else _host_logprobs(logprobs, num_rows)
        return StepResult([int(next_tokens[r]) for r in back], None if host_lp is None else [host_lp[r] for r in back])

    def _with_cpu_index_lists(self, metadata: PagedMetadata, num_prefill_tokens: int,
                              num_prefill_seqs: int) -> PagedMetadata:
        """Add the host-built index lists of the XLA-CPU paths: prefill tiles for the first
        `num_prefill_seqs` rows, decode page pairs for the rest."""
        k_cache, _ = self.kv_cache[0]
        num_kv_heads, num_blocks = k_cache.shape[:2]
        tables, lens = np.asarray(metadata.block_tables), np.asarray(metadata.context_lens)
        changes = {}
        if num_prefill_seqs:
            pairs = build_prefill_indices(
                tables[:num_prefill_seqs], lens[:num_prefill_seqs], np.asarray(metadata.query_start_loc),
                num_prefill_tokens, num_blocks, num_kv_heads, self.block_size,
                num_tiles=max_tiles(num_prefill_tokens, num_prefill_seqs))
            changes["prefill_pairs"] = tuple(jnp.asarray(a) for a in pairs)
            changes["max_query_len"] = None  # static, and the packed prefill has no use for it: fewer compiles
        if len(lens) > num_prefill_seqs:
            pairs = build_decode_indices(tables[num_prefill_seqs:], lens[num_prefill_seqs:], num_blocks,
                                         num_kv_heads, self.block_size)
            changes["decode_pairs"] = tuple(jnp.asarray(a) for a in pairs)
        return dataclasses.replace(metadata, **changes)


def _host_logprobs(logprobs, num_seqs: int) -> list[tuple[float, list[tuple[int, float]]]]:
    chosen, top_logp, top_ids = (np.asarray(x)[:num_seqs] for x in logprobs)
    return [(float(c), list(zip(ids.tolist(), lp.tolist()))) for c, lp, ids in zip(chosen, top_logp, top_ids)]
