"""Naive generation (`models.generate` is built on it): HF / FasterTransformer-style static batches over a contiguous KV cache.

A batch is padded (right padding) to a bucketed prompt length, one jitted prefill fills every row's
cache, then one jitted decode step per token runs the whole batch until its longest member is done.
Rows that finished early keep occupying their slot and compute (the waste continuous batching
removes). Shapes are bucketed so a run compiles a handful of programs, not one per batch.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.llama import Params, forward
from models.sampling import SamplingArrays, SamplingConfig, sample, sampling_kind
from paged_attention.buckets import pow2_at_least, round_up
from paged_attention.contiguous import init_kv_cache, kv_cache_bytes


def prompt_bucket(prompt_len: int) -> int:
    """Padded prompt length a batch whose longest prompt has `prompt_len` tokens is compiled for:
    powers of two up to 64 (16, 32, 64), then multiples of 64, so padding wastes at most 64 tokens
    a row on long prompts (pow2 would waste up to half)."""
    return pow2_at_least(prompt_len, minimum=16) if prompt_len <= 64 else round_up(prompt_len, 64)


def batch_shape(prompt_lens: list[int], max_new_tokens: list[int], batch_size: int | None = None,
                max_len: int | None = None) -> tuple[int, int, int]:
    """(rows, padded prompt length, cache length) of one static batch: rows = `batch_size` or the
    next power of two; cache = `max_len` or the padded prompt + the largest output, rounded up to 64
    (FasterTransformer sizes its cache per call). Batches of equal shape run the same programs."""
    rows = pow2_at_least(len(prompt_lens)) if batch_size is None else batch_size
    prompt_len = prompt_bucket(max(prompt_lens))
    return rows, prompt_len, round_up(prompt_len + max(max_new_tokens), 64) if max_len is None else max_len


@functools.partial(jax.jit, static_argnames=("config", "sampling_kind"), donate_argnames=("kv_cache",))
def prefill_step(params, tokens, positions, kv_cache, logits_indices, sampling, *, config, sampling_kind):
    """Prompt pass: tokens/positions i32[batch, prompt_len]; returns (i32[batch] first tokens, cache)."""
    logits, kv_cache = forward(params, tokens, positions, kv_cache, config=config,
                               backend="contiguous", logits_indices=logits_indices)
    step = jnp.zeros(tokens.shape[0], jnp.int32)
    return sample(logits, sampling, step, kind=sampling_kind), kv_cache


@functools.partial(jax.jit, static_argnames=("config", "sampling_kind"), donate_argnames=("kv_cache",))
def decode_step(params, tokens, positions, kv_cache, sampling, step, *, config, sampling_kind):
    """One token per row: tokens/positions i32[batch]; returns (i32[batch] next tokens, cache)."""
    logits, kv_cache = forward(params, tokens[:, None], positions[:, None], kv_cache, config=config,
                               backend="contiguous")
    return sample(logits[:, 0], sampling, step, kind=sampling_kind), kv_cache


def num_compilations() -> int:
    """Programs compiled so far by the naive generator's jitted steps (one per distinct shape)."""
    return prefill_step._cache_size() + decode_step._cache_size()


@dataclasses.dataclass
class BatchResult:
    """What one static batch produced, with host timestamps (time.perf_counter) for the harness."""

    tokens: list[list[int]]  # generated ids per row (EOS included when it stopped the row)
    first_token_time: float  # after the prefill's tokens reached the host
    end_time: float
    kv_bytes_allocated: int  # the contiguous cache this batch reserved
    kv_bytes_used: int  # bytes of it that held real (prompt or generated) tokens at the end
    kv_bytes_used_mean: float  # the same, averaged over the batch's steps (prefill + each decode)
    decode_steps: int


def run_static_batch(params: Params, config: ModelConfig, prompts: list[list[int]],
                     max_new_tokens: list[int], sampling: list[SamplingConfig], *,
                     row_ids: list[int] | None = None, ignore_eos: bool = False,
                     batch_size: int | None = None, max_len: int | None = None,
                     on_step: Callable[[], None] | None = None,
                     max_decode_steps: int | None = None) -> BatchResult:
    """Generate for one static batch; every row runs until the longest row is done.

    prompts: token ids per row; max_new_tokens / sampling: per row. row_ids name each row's PRNG
    stream (default 0..n-1), so a request's samples do not depend on which batch it landed in.
    batch_size / max_len: reserve a fixed `[batch_size, max_len]` cache (FasterTransformer-style,
    one shape for every batch) instead of the smallest bucket that fits this batch.
    max_decode_steps: stop after that many decode steps (every decode step of a batch runs the same
    program, so one step is enough to compile them all).
    """
    _validate(prompts, max_new_tokens, sampling, config)
    n = len(prompts)
    batch, prompt_len, max_len = batch_shape([len(p) for p in prompts], max_new_tokens, batch_size, max_len)
    needed = prompt_len + max(max_new_tokens)
    if n > batch or needed > max_len:
        raise ValueError(f"batch of {n} rows needing {needed} positions does not fit the reserved "
                         f"cache batch_size={batch}, max_len={max_len}")
    longest = max(len(p) + m for p, m in zip(prompts, max_new_tokens))
    if longest > config.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens needs {longest} positions; the model supports "
                         f"max_position_embeddings={config.max_position_embeddings}")
    lengths = np.ones(batch, np.int32)  # padding rows: a 1-token prompt, output ignored
    lengths[:n] = [len(p) for p in prompts]
    tokens = np.zeros((batch, prompt_len), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (batch, prompt_len))
    pad_sampling = sampling + [SamplingConfig()] * (batch - n)
    row_ids = list(range(n)) if row_ids is None else list(row_ids)
    sampling_arrays = SamplingArrays.from_configs(pad_sampling, row_ids + [0] * (batch - n))
    kind = sampling_kind(sampling)

    dtype = params["embed"].dtype
    cache = init_kv_cache(config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim, dtype)
    kv_allocated = kv_cache_bytes(cache)
    logits_indices = jnp.asarray(np.arange(batch) * prompt_len + lengths - 1, jnp.int32)
    next_tokens, cache = prefill_step(params, jnp.asarray(tokens), jnp.asarray(positions), cache,
                                      logits_indices, sampling_arrays, config=config, sampling_kind=kind)
    next_host = np.asarray(next_tokens)
    first_token_time = time.perf_counter()

    stop_ids = set() if ignore_eos else set(config.eos_token_ids)
    outputs: list[list[int]] = [[] for _ in range(n)]
    done = np.zeros(n, bool)
    step = 0
    held_tokens = 0  # real tokens in the cache, summed over steps
    while True:
        for row in np.flatnonzero(~done):
            outputs[row].append(int(next_host[row]))
            done[row] = len(outputs[row]) >= max_new_tokens[row] or int(next_host[row]) in stop_ids
        held_tokens += sum(len(p) + len(o) for p, o in zip(prompts, outputs))
        if on_step is not None:
            on_step()
        if done.all() or step == max_decode_steps:
            break
        step += 1
        step_array = jnp.full(batch, step, jnp.int32)
        next_tokens, cache = decode_step(params, next_tokens, jnp.asarray(lengths + step - 1), cache,
                                         sampling_arrays, step_array, config=config, sampling_kind=kind)
        next_host = np.asarray(next_tokens)
    per_token = config.kv_bytes_per_token(jnp.dtype(dtype).itemsize)
    used = sum(len(p) + len(o) for p, o in zip(prompts, outputs)) * per_token
    used_mean = held_tokens / (step + 1) * per_token
    return BatchResult(outputs, first_token_time, time.perf_counter(), kv_allocated, used, used_mean, step)


def _validate(prompts, max_new_tokens, sampling, config: ModelConfig) -> None:
    if not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if not (len(prompts) == len(max_new_tokens) == len(sampling)):
        raise ValueError("prompts, max_new_tokens and sampling must have one entry per row")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        if not all(isinstance(t, (int, np.integer)) for t in prompt):
            raise ValueError(f"prompts[{i}] must be a list of int token ids, got {prompt[:4]!r}...")
        if min(prompt) < 0 or max(prompt) >= config.vocab_size:
            raise ValueError(f"prompts[{i}] has token ids outside [0, {config.vocab_size})")
    for i, m in enumerate(max_new_tokens):
        if not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"max_new_tokens[{i}] must be an int >= 1, got {m!r}")
