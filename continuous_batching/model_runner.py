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
from continuous_batching.step_shapes import ShapeSet, StepShape
from paged_attention.decode_cpu import CHUNK as DECODE_CHUNK, bucket_size, build_decode_indices
from paged_attention.kv_cache import copy_blocks, init_paged_kv_cache, kv_cache_bytes
from paged_attention.metadata import PagedMetadata
from paged_attention.prefill_cpu import CHUNK as PREFILL_CHUNK, MIN_CHUNKS as PREFILL_MIN_CHUNKS
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
        self.shapes = ShapeSet()  # compiled step shapes; a server shares one across runners and freezes it
        # Precompiling by a dry run of the scheduler: a step whose shape is already compiled is not
        # run; each sequence "samples" its last new token again (the caller ignores EOS, or the
        # dry run ends requests no later than a real one would)
        self.dry_run = False

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
        num_prefill = sum(len(s.new_tokens) > 1 for s in ordered)
        flags = SamplerFlags.for_params([s.params for s in seqs])
        metadata, shape = self._metadata(ordered, num_prefill, self._own_shape(ordered, num_prefill))
        if self.shapes.frozen and (shape, flags) not in self.shapes.compiled:
            cover = self.shapes.cover(shape, flags)
            if cover is not None:  # run on a compiled shape's padding instead of compiling a new one
                metadata, shape = self._metadata(ordered, num_prefill, cover)
                self.shapes.padded_steps += 1
        if self.dry_run and (shape, flags) in self.shapes.compiled and not flags.logprobs:
            return StepResult([s.new_tokens[-1] for s in seqs], None)
        next_tokens, logprobs = self._run(ordered, num_prefill, metadata, shape, flags)
        back = [0] * len(seqs)  # original index -> row
        for position, i in enumerate(order):
            back[i] = position if position < num_prefill else shape.prefill_seqs + position - num_prefill
        host_lp = None if logprobs is None else _host_logprobs(logprobs, len(next_tokens))
        return StepResult([int(next_tokens[r]) for r in back], None if host_lp is None else [host_lp[r] for r in back])

    def compile_shape(self, shape: StepShape, flags: SamplerFlags) -> None:
        """Compile (by running it on padding only: no token is written) the step program of `shape`."""
        metadata, shape = self._metadata([], 0, shape)
        self._run([], 0, metadata, shape, flags)

    def _own_shape(self, ordered: list[SeqStep], num_prefill: int) -> StepShape:
        """The bucketed shape of these sequences' step (pair-list lengths filled in by `_metadata`)."""
        max_blocks = self.blocks_bucket(max(len(s.block_table) for s in ordered))
        num_decode = len(ordered) - num_prefill
        if num_prefill == 0:
            return StepShape(0, 0, self.seq_bucket(num_decode), max_blocks, 0, 0)
        prefill_tokens = sum(len(s.new_tokens) for s in ordered[:num_prefill])
        return StepShape(bucket_size(prefill_tokens, MIN_PREFILL_TOKENS), bucket_pow2(num_prefill),
                         self.seq_bucket(num_decode) if num_decode else 0, max_blocks, 0, 0)

    def _metadata(self, ordered: list[SeqStep], num_prefill: int, shape: StepShape) -> tuple[PagedMetadata, StepShape]:
        """Device metadata padded to `shape` (its pair-list lengths are minimums), and the exact shape."""
        tables, lens = [s.block_table for s in ordered], [s.context_len for s in ordered]
        query_lens = [len(s.new_tokens) for s in ordered]
        if shape.decode_only:
            metadata = PagedMetadata.build(tables, lens, query_lens, self.block_size, num_tokens=shape.decode_seqs,
                                           num_seqs=shape.decode_seqs, max_blocks=shape.max_blocks)
            metadata = dataclasses.replace(metadata, decode_only=True, max_query_len=1)  # also for padding only
        else:
            metadata = PagedMetadata.build_split(
                tables, lens, query_lens, self.block_size, num_prefill=num_prefill,
                num_prefill_tokens=shape.prefill_tokens, num_prefill_seqs=shape.prefill_seqs,
                num_decode_seqs=shape.decode_seqs, max_blocks=shape.max_blocks)
        if self.backend == "paged_cpu":
            metadata = self._with_cpu_index_lists(metadata, shape)
        pairs = (len(metadata.decode_pairs[0]) if metadata.decode_pairs else 0,
                 len(metadata.prefill_pairs[2]) if metadata.prefill_pairs else 0)
        return metadata, dataclasses.replace(shape, decode_pairs=pairs[0], prefill_pairs=pairs[1])

    def _run(self, ordered: list[SeqStep], num_prefill: int, metadata: PagedMetadata, shape: StepShape,
             flags: SamplerFlags):
        """Fill the token, position and sampler arrays of `shape` and run the jitted step."""
        num_tokens = shape.prefill_tokens + shape.decode_seqs
        num_rows = shape.prefill_seqs + shape.decode_seqs
        tokens = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        last = np.zeros(num_rows, np.int32)  # each row's last new token; padding rows: 0 (ignored)
        row_steps: list[SeqStep] = [SeqStep([], 0, [])] * num_rows
        start = 0
        for position, s in enumerate(ordered):
            q_len = len(s.new_tokens)
            if position < num_prefill:
                row = position
            else:  # decode rows own one token each, after the prefill part
                row, start = shape.prefill_seqs + position - num_prefill, shape.prefill_tokens + position - num_prefill
            tokens[start:start + q_len] = s.new_tokens
            positions[start:start + q_len] = np.arange(s.context_len - q_len, s.context_len)
            last[row] = start + q_len - 1
            row_steps[row] = s
            start += q_len
        sampler_inputs = build_inputs(
            [r.params for r in row_steps], [np.zeros(2, np.uint32) if r.key is None else r.key for r in row_steps],
            [r.num_generated for r in row_steps],
            [(list(r.history[0]), list(r.history[1])) for r in row_steps] if flags.penalties else None, num_rows)
        self.shapes.add(shape, flags)
        self.shapes_run.add(dataclasses.astuple(shape))
        next_tokens, logprobs, self.kv_cache = _model_step(
            self.model.params, jax.device_put(tokens), jax.device_put(positions), self.kv_cache, metadata,
            jax.device_put(last), sampler_inputs, config=self.model.config, backend=self.backend, flags=flags)
        return np.asarray(next_tokens), logprobs

    def _with_cpu_index_lists(self, metadata: PagedMetadata, shape: StepShape) -> PagedMetadata:
        """Add the host-built index lists of the XLA-CPU paths: prefill tiles for the first
        `shape.prefill_seqs` rows, decode page pairs for the rest, each list at least as long as
        the shape asks."""
        k_cache, _ = self.kv_cache[0]
        num_kv_heads, num_blocks = k_cache.shape[:2]
        tables, lens = np.asarray(metadata.block_tables), np.asarray(metadata.context_lens)
        num_prefill_seqs = shape.prefill_seqs
        changes = {}
        if num_prefill_seqs:
            pairs = build_prefill_indices(
                tables[:num_prefill_seqs], lens[:num_prefill_seqs], np.asarray(metadata.query_start_loc),
                shape.prefill_tokens, num_blocks, num_kv_heads, self.block_size,
                num_tiles=max_tiles(shape.prefill_tokens, num_prefill_seqs),
                min_chunks=max(PREFILL_MIN_CHUNKS, shape.prefill_pairs // PREFILL_CHUNK))
            changes["prefill_pairs"] = tuple(jax.device_put(a) for a in pairs)
            changes["max_query_len"] = None  # static, and the packed prefill has no use for it: fewer compiles
        if len(lens) > num_prefill_seqs:
            pairs = build_decode_indices(tables[num_prefill_seqs:], lens[num_prefill_seqs:], num_blocks,
                                         num_kv_heads, self.block_size,
                                         min_chunks=max(1, shape.decode_pairs // DECODE_CHUNK))
            changes["decode_pairs"] = tuple(jax.device_put(a) for a in pairs)
        return dataclasses.replace(metadata, **changes)


def _host_logprobs(logprobs, num_seqs: int) -> list[tuple[float, list[tuple[int, float]]]]:
    chosen, top_logp, top_ids = (np.asarray(x)[:num_seqs] for x in logprobs)
    return [(float(c), list(zip(ids.tolist(), lp.tolist()))) for c, lp, ids in zip(chosen, top_logp, top_ids)]
