"""Memory saved by block sharing (vLLM paper Fig. 15): parallel sampling and beam search.

Each step, the KV blocks in use WITH sharing are counted by the real `BlockManager` (`fork` shares
every block of a sequence, `append_slot` copies a shared, partly filled last block on write), and
the blocks the same live sequences would need WITHOUT sharing are `sum(ceil(tokens / block_size))`.

    memory_saved_fraction = 1 - sum over steps of blocks with sharing
                                / sum over steps of blocks without sharing

over every generation step of every request (step t: each live sequence holds its prompt and t
generated tokens, i.e. counted after the step's slots are appended, before finished ones are freed).

    parallel_sampling  n samples of one prompt: the prompt is allocated once and forked n-1 times.
                       Sample 0 generates the request's `output_len` tokens; each other sample's
                       length is an independent draw from the workload's own output lengths (their
                       empirical distribution, seeded numpy Generator), so samples finish at
                       different steps, as in the paper. Token ids do not change memory (prefix
                       caching is off), so no model runs.
    beam_search        real beam search with the workload's model: width k, the k best continuations
                       by summed log-probs, `output_len` steps, no EOS, chosen by the engine's own
                       `BeamSearchState` (continuous_batching/beam_search.py). The model runs on the
                       naive contiguous cache `[k, kv_heads, max_len, head_dim]` per layer, whose rows
                       are reordered by each new beam's parent before every step. The block manager mirrors
                       it: each new beam forks its parent, the old generation is freed, then each new
                       beam appends its token. (vLLM reuses a parent as its last child; forking first
                       and freeing before appending is the same: a partly filled last block is copied
                       only when two or more children of one parent write into it.)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from continuous_batching.beam_search import BeamSearchState
from experiments.trace import RequestRecord, RunTrace, kv_bytes_per_token
from experiments.workloads import Request
from models.llama import forward
from models.static_batch import prompt_bucket
from paged_attention.buckets import round_up
from paged_attention.block_manager import BlockManager
from paged_attention.contiguous import init_kv_cache


@dataclasses.dataclass
class SharingCounter:
    """Block counts summed over steps, with and without sharing, and the copies sharing cost."""

    block_size: int
    with_sharing: int = 0  # physical blocks in use (BlockManager.num_used_blocks), summed over steps
    without_sharing: int = 0  # sum over live sequences of ceil(tokens / block_size), summed over steps
    real_tokens: int = 0  # token slots filled in the used blocks (a shared block counted once)
    steps: int = 0
    cow_copies: int = 0
    used_blocks_peak: int = 0
    real_tokens_peak: int = 0

    def record(self, manager: BlockManager, live: list[int]) -> None:
        """Count one step: `live` are the sequences generating at this step."""
        used, real = manager.num_used_blocks, manager.num_real_tokens
        self.with_sharing += used
        self.without_sharing += sum(-(-manager.num_tokens(s) // self.block_size) for s in live)
        self.real_tokens += real
        self.steps += 1
        self.used_blocks_peak = max(self.used_blocks_peak, used)
        self.real_tokens_peak = max(self.real_tokens_peak, real)

    def append(self, manager: BlockManager, seq_id: int, token_ids) -> None:
        """`append_slot` (`token_ids`: the sequence's tokens, the new one last) and count its
        copy-on-write copies."""
        _, copies = manager.append_slot(seq_id, token_ids)
        self.cow_copies += len(copies)

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.with_sharing / self.without_sharing if self.without_sharing else 0.0


# ----- parallel sampling (no model) ------------------------------------------------------------------
def sample_output_lens(requests: list[Request], width: int, seed: int) -> list[list[int]]:
    """Per request, the output length of each of its `width` samples: the request's own for sample 0,
    then `width - 1` draws (with replacement) from all the workload's output lengths."""
    rng = np.random.default_rng(seed)
    pool = np.array([r.output_len for r in requests])
    return [[r.output_len] + rng.choice(pool, width - 1).tolist() for r in requests]


def simulate_parallel_sampling(manager: BlockManager, prompt: list[int], output_lens: list[int],
                               counter: SharingCounter) -> None:
    """One request's samples: allocate the prompt once, fork it per extra sample, append one token
    per live sample per step; a sample is freed after the step that produced its last token."""
    samples = list(range(len(output_lens)))  # sequence ids
    manager.allocate(samples[0], prompt)
    for child in samples[1:]:
        manager.fork(samples[0], child)
    for step in range(1, max(output_lens) + 1):
        live = [s for s in samples if output_lens[s] >= step]
        for s in live:
            counter.append(manager, s, range(len(prompt) + step))  # ids do not matter without prefix caching
        counter.record(manager, live)
        for s in live:
            if output_lens[s] == step:
                manager.free(s)


# ----- beam search (the model runs) ------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("kv_cache",))
def beam_prefill(params, tokens, positions, kv_cache, last_index, *, config):
    """Prompt pass at batch 1 (compiled once per prompt bucket, whatever the beam width).

    tokens/positions: i32[1, prompt_bucket]; kv_cache: per layer [1, kv_heads, max_len, head_dim];
    last_index: i32[1], the prompt's last real token. Returns (f32[vocab] next-token log-probs, cache).
    """
    logits, kv_cache = forward(params, tokens, positions, kv_cache, config=config,
                               backend="contiguous", logits_indices=last_index)  # f32[1, vocab]
    return jax.nn.log_softmax(logits[0]), kv_cache


@functools.partial(jax.jit, static_argnames=("config", "num_candidates"), donate_argnames=("kv_cache",))
def beam_step(params, tokens, positions, parents, kv_cache, *, config, num_candidates):
    """Give row b of the cache row parents[b]'s history, feed each beam's last token (i32[k] tokens,
    positions, parents), and return each beam's `num_candidates` best next tokens: (f32[k, c]
    log-probs, i32[k, c] tokens, the cache)."""
    kv_cache = _reorder(kv_cache, parents)
    logits, kv_cache = forward(params, tokens[:, None], positions[:, None], kv_cache, config=config,
                               backend="contiguous")  # f32[k, 1, vocab]
    log_probs, next_tokens = jax.lax.top_k(jax.nn.log_softmax(logits[:, 0], axis=-1), num_candidates)
    return log_probs, next_tokens.astype(jnp.int32), kv_cache


def _reorder(kv_cache, parents):
    """Row b of the new cache is row parents[b] of the old one (every layer, K and V)."""
    return [(jnp.take(k, parents, axis=0), jnp.take(v, parents, axis=0)) for k, v in kv_cache]


def _candidates(log_probs, tokens) -> list[list[tuple[int, float]]]:
    """Per beam, its (token, log-prob) candidates, best first, from f32/i32[beams, c] arrays."""
    return [list(zip(t, lp)) for t, lp in zip(np.asarray(tokens).tolist(), np.asarray(log_probs).tolist())]


def beam_search(model, request: Request, width: int, manager: BlockManager, counter: SharingCounter,
                max_len: int) -> tuple[list[list[int]], list[float]]:
    """Beam search of `request.output_len` tokens, mirrored step by step in `manager` (which ends with
    none of this request's blocks in use). The beams are chosen by the engine's own beam search
    (`continuous_batching.beam_search.BeamSearchState`, without stop tokens: every beam runs the
    whole length, as in the paper's figure); here the model runs in-engine, one step for all beams
    on a cache whose rows follow their parents, instead of one engine round per beam. Returns the
    final beams' tokens and their summed log-probs, best first."""
    config, params = model.config, model.params
    prompt = list(request.prompt)
    state = BeamSearchState(prompt, width, request.output_len)
    bucket = prompt_bucket(len(prompt))
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, :len(prompt)] = prompt
    positions = np.arange(bucket, dtype=np.int32)[None]
    cache = init_kv_cache(config.num_layers, 1, max_len, config.num_kv_heads, config.head_dim,
                          params["embed"].dtype)
    log_probs, cache = beam_prefill(params, jnp.asarray(tokens), jnp.asarray(positions), cache,
                                    jnp.asarray([len(prompt) - 1]), config=config)
    candidates = _candidates(*jax.lax.top_k(log_probs[None], 2 * width))  # the empty beam's
    cache = _reorder(cache, jnp.zeros(width, jnp.int32))  # k rows of the prompt: [width, kv_heads, max_len, hd]
    ids = itertools.count()
    seq_ids = {(): next(ids)}  # beam tokens -> its sequence in the block manager
    manager.allocate(seq_ids[()], prompt)
    for step in range(request.output_len):
        row_of = {beam.tokens: row for row, beam in enumerate(state.beams)}
        state.advance(candidates)
        parents = [row_of[beam.tokens[:-1]] for beam in state.beams]
        children = {beam.tokens: next(ids) for beam in state.beams}
        for beam in state.beams:
            manager.fork(seq_ids[beam.tokens[:-1]], children[beam.tokens])
        for seq in seq_ids.values():
            manager.free(seq)
        seq_ids = children
        for beam in state.beams:
            counter.append(manager, seq_ids[beam.tokens], prompt + list(beam.tokens))
        counter.record(manager, list(seq_ids.values()))
        if step + 1 < request.output_len:  # feed this step's tokens, at position len(prompt) + step
            last = jnp.asarray([beam.tokens[-1] for beam in state.beams], jnp.int32)
            log_probs, next_tokens, cache = beam_step(
                params, last, jnp.full(width, len(prompt) + step, jnp.int32), jnp.asarray(parents, jnp.int32),
                cache, config=config, num_candidates=2 * width)
            candidates = _candidates(log_probs, next_tokens)
    for seq in seq_ids.values():
        manager.free(seq)
    return [list(beam.tokens) for beam in state.beams], [beam.cum_logprob for beam in state.beams]


# ----- the harness engine ----------------------------------------------------------------------------
class SharingSimEngine:
    """A harness engine whose 'time' is generation steps; see the module docstring. Requests run one
    at a time (sharing happens within a request), each on its own clock of steps."""

    simulated = True

    def __init__(self, model, run_config, requests: list[Request]):
        self.model, self.mode, self.width = model, run_config.mode, run_config.width
        self.block_size, self.seed = run_config.block_size, run_config.seed
        self.max_requests = run_config.max_requests
        self.per_token_bytes = kv_bytes_per_token(model)
        if self.mode == "beam_search":
            needed = max(len(r.prompt) + r.output_len for r in requests[:self.max_requests])
            if needed > model.config.max_position_embeddings:
                raise ValueError(f"beam search needs {needed} positions; the model supports "
                                 f"{model.config.max_position_embeddings}: cap the workload")
            self.max_len = round_up(needed, 64)  # prompt padding past it is dropped by the cache write

    def warmup(self) -> None:
        pass  # nothing here is timed: the metrics count blocks

    def serve(self, requests: list[Request], progress) -> RunTrace:
        start = time.perf_counter()
        counter = SharingCounter(self.block_size)
        if self.mode == "parallel_sampling":
            chosen, lens = requests, sample_output_lens(requests, self.width, self.seed)
        else:
            chosen = requests[:self.max_requests]
            lens = [[r.output_len] * self.width for r in chosen]
        num_blocks = max(self.width * -(-(len(r.prompt) + max(n)) // self.block_size) + 1
                         for r, n in zip(chosen, lens))
        manager = BlockManager(num_blocks, self.block_size)
        records = []
        for request, output_lens in zip(chosen, lens):
            if self.mode == "parallel_sampling":
                simulate_parallel_sampling(manager, list(request.prompt), output_lens, counter)
            else:
                beam_search(self.model, request, self.width, manager, counter, self.max_len)
            if manager.num_used_blocks:
                raise RuntimeError(f"request {request.request_id} left {manager.num_used_blocks} "
                                   "blocks in use")
            records.append(RequestRecord(request.request_id, len(request.prompt), request.output_len,
                                         0.0, 1.0, float(max(output_lens))))
            progress(1)
        extra = {"memory_saved_fraction": counter.saved_fraction,
                 "blocks_with_sharing_mean": counter.with_sharing / counter.steps,
                 "blocks_without_sharing_mean": counter.without_sharing / counter.steps,
                 "cow_copies": counter.cow_copies, "iterations": counter.steps,
                 "num_requests": len(chosen), "generated_tokens": sum(map(sum, lens)),
                 "sim_seconds": time.perf_counter() - start}
        slot_bytes = self.block_size * self.per_token_bytes
        return RunTrace(records, float(counter.steps), counter.used_blocks_peak * slot_bytes,
                        counter.real_tokens_peak * self.per_token_bytes,
                        counter.real_tokens / (counter.with_sharing * self.block_size),
                        sum(map(sum, lens)), simulated=True, extra_metrics=extra)
