"""Model runner: turns one scheduled step (which sequences, which new tokens, where their blocks are)
into padded device arrays, runs the model on the paged KV cache, and samples each sequence's next
token on device (`continuous_batching.sampler`).

A step is split as vLLM splits it: sequences bringing several tokens (prompts, chunks, recomputes)
go first, to the ragged prefill kernel; sequences bringing one token (decodes) after, to the decode
kernel, in the same jitted model step. The attention backend's metadata builder
(`models.attention`) turns the ordered sequences into the step's `PagedMetadata` (on `paged_cpu`
with the XLA-CPU paths' index lists, so attention work follows each sequence's own length).
Shapes are bucketed (`paged_attention/buckets.py`) so `jax.jit` compiles a bounded number of
programs: prefill tokens to 2 sizes per octave (at least `MIN_PREFILL_TOKENS`; padding costs GEMM
work), prefill rows to a power of two, decode rows to a power of two (at least `MIN_SEQ_BUCKET`,
but one row for a lone sequence), block tables to a power of two blocks (at least
`MIN_BLOCK_BUCKET`, at most `max_blocks_per_seq`). Mixing a long prompt with many decodes thus costs prompt x context plus
decodes x context, not (prompt x decodes) x context.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import models
from continuous_batching.sampler import SamplerFlags, build_inputs, sample_tokens
from continuous_batching.prepared_step import PreparedStep, StepResult, split_evenly, step_result
from continuous_batching.request import Sequence
from continuous_batching.sampling_params import SamplingParams
from models.attention import paged_backend
from models.llama import forward
from models.ops import Ops, get_ops, rope_cos_sin
from continuous_batching.step_shapes import ShapeSet, StepShape
from paged_attention.buckets import pow2_at_least, two_per_octave
from paged_attention.kv_cache import (cache_dtype, copy_blocks, init_paged_kv_cache, kv_cache_bytes, swap_in_blocks,
                                      swap_out_blocks)
from paged_attention.metadata import PagedMetadata
from quantization.kv_int8 import check_folded_scales

MIN_SEQ_BUCKET = 4  # but a lone sequence decodes on one row, where XLA CPU's dots read the weights faster
MIN_BLOCK_BUCKET = 8
MIN_PREFILL_TOKENS = 16
GREEDY = SamplingParams(temperature=0)
NO_KEY = np.zeros(2, np.uint32)


def _step(params, kv_cache, inputs, *, config, backend, ops, flags, sample=sample_tokens):
    """One model step on pages, then sampling; returns (i32[num_seqs] tokens, logprobs, kv_cache).
    inputs: (tokens i32[num_tokens], positions i32[num_tokens], metadata, logits_indices i32[num_seqs],
    sampler inputs, the positions' RoPE (cos, sin) f32[num_tokens, head_dim]): the host arrays of
    `PagedModelRunner.prepare`, which the jitted call transfers (or placed on the mesh first)."""
    tokens, positions, metadata, logits_indices, sampler_inputs, rope = inputs
    logits, kv_cache = forward(params, tokens, positions, kv_cache, metadata, config=config, backend=backend,
                               ops=ops, logits_indices=logits_indices, rope=rope)
    next_tokens, logprobs = sample(logits, sampler_inputs, flags)
    return next_tokens, logprobs, kv_cache


# The step compiled as one program (every ops set but those with `jit_step` False, which run
# `_step` as Python calling one compiled program per op, with sampling as one more).
_model_step = jax.jit(_step, static_argnames=("config", "backend", "ops", "flags"), donate_argnames=("kv_cache",))
_sample_alone = jax.jit(sample_tokens, static_argnames=("flags",))


def num_compilations() -> int:
    """Programs compiled so far by the runner's jitted step (one per distinct shape and flags)."""
    return _model_step._cache_size()


class PagedModelRunner:
    """Owns the device side of one model: its params (placed), the paged KV cache, the host pool
    that swapped-out blocks wait in, and the jitted step.

    kernels: the ops set (`models.ops`) by name or instance. kv_cache_dtype: the cache's dtype
    ("auto": the model's; "fp8_e4m3": FP8, `paged_attention.kv_cache`; "int8": codes in the units of
    scales folded into the params, `quantization/kv_int8.py`). mesh: a `jax.sharding.Mesh` to place
    params, cache and every step's inputs on (None: the default device); `param_sharding` (a sharding, a pytree of them matching
    the params, or a function of the ops set's prepared params returning one, as
    `distributed.tensor_parallel.runner_placement` gives) and `kv_sharding` override the default,
    replicated over the mesh."""

    num_microbatches = 1  # micro-batches a step is cut into (a pipelined runner: one per stage)

    def __init__(self, model: models.Model, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_blocks_per_seq: int, backend: str = "paged_cpu", kernels: "str | Ops" = "xla",
                 kv_cache_dtype: str = "auto", num_cpu_blocks: int = 0, mesh=None,
                 param_sharding=None, kv_sharding=None):
        config = model.config
        if kv_cache_dtype == "int8":
            check_folded_scales(model.params, "int8", "kv_cache_dtype")
        self.model, self.backend, self.ops = model, backend, get_ops(kernels)
        self.metadata_builder = paged_backend(backend).metadata_builder(block_size, num_blocks,
                                                                        self.ops.kv_heads_seen(config))
        self.max_num_seqs, self.max_blocks, self.num_cpu_blocks = max_num_seqs, max_blocks_per_seq, num_cpu_blocks
        params = self.ops.prepare_params(model.params)  # e.g. fused wqkv / w_gate_up for the pallas set
        self._place(params, num_blocks, block_size, cache_dtype(kv_cache_dtype, model.dtype), mesh,
                    param_sharding, kv_sharding)
        self.host_pool = None  # per layer (k, v) numpy [kv_heads, num_cpu_blocks, block_size, head_dim]
        # (prefill tokens, prefill rows, decode rows, blocks, decode page pairs, prefill tile pairs)
        self.shapes_run: set[tuple[int, ...]] = set()
        self.shapes = ShapeSet()  # compiled step shapes; a server shares one across runners and freezes it
        # Precompiling by a dry run of the scheduler: a step whose shape is already compiled is not
        # run; each sequence "samples" its last new token again (the caller ignores EOS, or the
        # dry run ends requests no later than a real one would)
        self.dry_run = False
        # Called with ("run" | "move_blocks", args) before each piece of device work: a multi-process
        # leader broadcasts it so that every process runs the same programs (`continuous_batching/multihost.py`)
        self.on_device_work = None

    def _place(self, params, num_blocks: int, block_size: int, dtype, mesh, param_sharding, kv_sharding) -> None:
        """Put the (prepared) params and a zeroed paged KV cache on the device(s): `self.params`,
        `self.kv_cache`, and the sharding every step's inputs go to (`self.input_sharding`)."""
        config = self.model.config
        replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
        self.input_sharding = replicated
        if callable(param_sharding):
            param_sharding = param_sharding(params)
        self.params = jax.device_put(params, param_sharding or replicated)
        cache = init_paged_kv_cache(config.num_layers, num_blocks, block_size, config.num_kv_heads,
                                    config.head_dim, dtype)
        if mesh is not None or kv_sharding is not None:
            cache = jax.device_put(cache, kv_sharding or replicated)
        self.kv_cache = cache

    @property
    def kv_cache_bytes(self) -> int:
        return kv_cache_bytes(self.kv_cache)

    # ----- block moves the block manager asked for (before the step that needs them) -------------
    def move_blocks(self, swap_out: list[tuple[int, int]], copies: list[tuple[int, int]],
                    swap_in: list[tuple[int, int]]) -> None:
        """Carry out one step's block moves in the order the block manager made them: swap-out
        (device block -> host block), copy-on-write (src -> dst), swap-in (host block -> device block)."""
        if self.on_device_work is not None and (swap_out or copies or swap_in):
            self.on_device_work(("move_blocks", (swap_out, copies, swap_in)))
        if swap_out:
            gpu, cpu = zip(*swap_out)
            for (pool_k, pool_v), (k, v) in zip(self._host_pool(), swap_out_blocks(self.kv_cache, list(gpu))):
                pool_k[:, list(cpu)], pool_v[:, list(cpu)] = k, v
        self.copy_blocks(copies)
        if swap_in:
            cpu, gpu = zip(*swap_in)
            arrays = [(pool_k[:, list(cpu)], pool_v[:, list(cpu)]) for pool_k, pool_v in self._host_pool()]
            self.kv_cache = swap_in_blocks(self.kv_cache, arrays, list(gpu))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Apply copy-on-write copies [(src, dst)] the block manager asked for."""
        if copies:
            src, dst = (jnp.asarray(x, jnp.int32) for x in zip(*copies))
            self.kv_cache = copy_blocks(self.kv_cache, src, dst)

    def _host_pool(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self.host_pool is None:
            if self.num_cpu_blocks < 1:
                raise ValueError("swapping needs num_cpu_blocks >= 1")
            k, _ = self.kv_cache[0]
            shape = (k.shape[0], self.num_cpu_blocks, *k.shape[2:])
            self.host_pool = [(np.zeros(shape, k.dtype), np.zeros(shape, k.dtype)) for _ in self.kv_cache]
        return self.host_pool

    def seq_bucket(self, num_seqs: int) -> int:
        return 1 if num_seqs == 1 else max(MIN_SEQ_BUCKET, pow2_at_least(num_seqs))

    def blocks_bucket(self, num_blocks: int) -> int:
        return min(self.max_blocks, max(MIN_BLOCK_BUCKET, pow2_at_least(num_blocks)))

    def step(self, seqs: list[Sequence]) -> StepResult:
        """Run one step; returns each sequence's next token (and log-probs if any row asks), in the
        order given. The step runs as one micro-batch here (a pipelined runner cuts it into several,
        `microbatches`), each prepared on its own."""
        if not 0 < len(seqs) <= self.max_num_seqs:
            raise ValueError(f"a step takes 1..max_num_seqs={self.max_num_seqs} sequences, got {len(seqs)}")
        chunks = self.microbatches(seqs)
        prepared = [self.prepare(chunk, skip_compiled=self.dry_run) for chunk in chunks]
        if all(p is None for p in prepared):  # a dry run on compiled shapes: each sequence "samples" its last new token
            return StepResult([s.new_tokens[-1] for s in seqs], None)
        prepared = [p or self.prepare(chunk) for p, chunk in zip(prepared, chunks)]
        results = [step_result(p, *out) for p, out in zip(prepared, self.run_microbatches(prepared))]
        logprobs = None if all(r.logprobs is None for r in results) else [
            lp for r in results for lp in (r.logprobs or [None] * len(r.tokens))]
        return StepResult([t for r in results for t in r.tokens], logprobs)

    def microbatches(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """The step's sequences cut into `num_microbatches` contiguous runs (`split_evenly`)."""
        return split_evenly(seqs, self.num_microbatches)

    def run_microbatches(self, prepared: list["PreparedStep"]) -> list[tuple[np.ndarray, object]]:
        """`run` each prepared micro-batch, in order."""
        return [self.run(p) for p in prepared]

    def compile_shape(self, shape: StepShape, flags: SamplerFlags) -> None:
        """Compile (by running it on padding only: no token is written) the step program of `shape`."""
        self.run(self.prepare([], shape, flags))

    def prepare(self, seqs: list[Sequence], shape: StepShape | None = None, flags: SamplerFlags | None = None,
                *, skip_compiled: bool = False) -> "PreparedStep | None":
        """One pass from the scheduled sequences to the step's host arrays (numpy; `run` moves them
        to the device at once). Sequences bringing several tokens go first (prefill kernel), single
        tokens after (decode kernel); sizes are padded to the step's bucketed shape, or, once the
        shape set is frozen, to the cheapest compiled shape that covers it. `shape`: pad to exactly
        this one (compiling a shape on padding only). `skip_compiled`: None, before building the
        inputs, when the step's shape is compiled already (and it asks for no log-probs)."""
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].num_new_tokens == 1)
        ordered = [seqs[i] for i in order]
        num_prefill = sum(s.num_new_tokens > 1 for s in ordered)
        flags = flags or SamplerFlags.for_params([GREEDY if s.params is None else s.params for s in seqs])
        metadata, own = self._metadata(ordered, num_prefill, shape or self._own_shape(ordered, num_prefill))
        if shape is None and self.shapes.frozen and (own, flags) not in self.shapes.compiled:
            cover = self.shapes.cover(own, flags)
            if cover is not None:  # run on a compiled shape's padding instead of compiling a new one
                metadata, own = self._metadata(ordered, num_prefill, cover)
                self.shapes.padded_steps += 1
        if skip_compiled and (own, flags) in self.shapes.compiled and not flags.logprobs:
            return None
        rows = [0] * len(seqs)  # given index -> row of the step's outputs
        for position, i in enumerate(order):
            rows[i] = position if position < num_prefill else own.prefill_seqs + position - num_prefill
        return PreparedStep(own, flags, self._inputs(ordered, num_prefill, metadata, own, flags), rows)

    def run(self, prepared: "PreparedStep") -> tuple[np.ndarray, object]:
        """Run the jitted step on a prepared step's inputs (placed on the mesh first, when there is
        one): (i32[rows] next tokens on the host, device log-probs or None)."""
        if self.on_device_work is not None:
            self.on_device_work(("run", (prepared,)))
        self.record_shape(prepared)
        # a one-program step on the default device takes the numpy leaves as they are: the jitted
        # call's own transfer of them costs less host time than a device_put of the pytree (the
        # unfused ops set, one program per op, would transfer them again for every op)
        inputs = (prepared.inputs if self.input_sharding is None and self.ops.jit_step
                  else jax.device_put(prepared.inputs, self.input_sharding))
        step = _model_step if self.ops.jit_step else functools.partial(_step, sample=_sample_alone)
        next_tokens, logprobs, self.kv_cache = step(
            self.params, self.kv_cache, inputs, config=self.model.config, backend=self.backend, ops=self.ops,
            flags=prepared.flags)
        return np.asarray(next_tokens), logprobs

    def record_shape(self, prepared: "PreparedStep") -> None:
        """Note that `prepared`'s step shape runs (compiled from now on)."""
        self.shapes.add(prepared.shape, prepared.flags)
        self.shapes_run.add(dataclasses.astuple(prepared.shape))

    def lower(self, prepared: "PreparedStep"):
        """The one-program step lowered for a prepared step's shapes, without running it
        (`.compile().as_text()` is the optimized HLO: the collectives XLA placed, for instance)."""
        inputs = jax.device_put(prepared.inputs, self.input_sharding)
        return _model_step.lower(self.params, self.kv_cache, inputs, config=self.model.config, backend=self.backend,
                                 ops=self.ops, flags=prepared.flags)

    def _own_shape(self, ordered: list[Sequence], num_prefill: int) -> StepShape:
        """The bucketed shape of these sequences' step (pair-list lengths filled in by `_metadata`)."""
        max_blocks = self.blocks_bucket(max(len(s.block_table) for s in ordered))
        num_decode = len(ordered) - num_prefill
        if num_prefill == 0:
            return StepShape(0, 0, self.seq_bucket(num_decode), max_blocks, 0, 0)
        prefill_tokens = sum(s.num_new_tokens for s in ordered[:num_prefill])
        return StepShape(two_per_octave(prefill_tokens, MIN_PREFILL_TOKENS), pow2_at_least(num_prefill),
                         self.seq_bucket(num_decode) if num_decode else 0, max_blocks, 0, 0)

    def _metadata(self, ordered: list[Sequence], num_prefill: int, shape: StepShape) -> tuple[PagedMetadata, StepShape]:
        """The backend's metadata padded to `shape` (its pair-list lengths are minimums), and the exact shape."""
        metadata = self.metadata_builder.build(
            [s.block_table for s in ordered], [s.context_len for s in ordered], [s.num_new_tokens for s in ordered],
            num_prefill=num_prefill, prefill_tokens=shape.prefill_tokens, prefill_seqs=shape.prefill_seqs,
            decode_seqs=shape.decode_seqs, max_blocks=shape.max_blocks, min_decode_pairs=shape.decode_pairs,
            min_prefill_pairs=shape.prefill_pairs)
        decode_pairs, prefill_pairs = metadata.num_pairs
        return metadata, dataclasses.replace(shape, decode_pairs=decode_pairs, prefill_pairs=prefill_pairs)

    def _inputs(self, ordered: list[Sequence], num_prefill: int, metadata: PagedMetadata, shape: StepShape,
                flags: SamplerFlags) -> tuple:
        """The step's host arrays for `shape`: (tokens i32[num_tokens], positions i32[num_tokens],
        metadata, logits_indices i32[num_rows]: each row's last new token, sampler inputs, RoPE
        (cos, sin) f32[num_tokens, head_dim]: built here once, since XLA CPU would otherwise recompute
        sin / cos inside each fusion of each layer that reads them)."""
        num_tokens = shape.prefill_tokens + shape.decode_seqs
        num_rows = shape.prefill_seqs + shape.decode_seqs
        tokens = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        last = np.zeros(num_rows, np.int32)  # each row's last new token; padding rows: 0 (ignored)
        row_seqs: list[Sequence | None] = [None] * num_rows  # padding rows: None
        start = 0
        for position, s in enumerate(ordered):
            q_len = s.num_new_tokens
            if position < num_prefill:
                row = position
            else:  # decode rows own one token each, after the prefill part
                row, start = shape.prefill_seqs + position - num_prefill, shape.prefill_tokens + position - num_prefill
            tokens[start:start + q_len] = s.new_tokens
            positions[start:start + q_len] = np.arange(s.context_len - q_len, s.context_len)
            last[row] = start + q_len - 1
            row_seqs[row] = s
            start += q_len
        sampler_inputs = build_inputs(
            [GREEDY if s is None or s.params is None else s.params for s in row_seqs],
            [NO_KEY if s is None or s.key is None else s.key for s in row_seqs],
            [0 if s is None else len(s.output) for s in row_seqs],
            [([], []) if s is None else (s.prompt, s.output) for s in row_seqs] if flags.penalties else None,
            num_rows)
        config = self.model.config
        return tokens, positions, metadata, last, sampler_inputs, rope_cos_sin(positions, config.head_dim,
                                                                               config.rope_theta, xp=np)
