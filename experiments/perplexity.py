"""Perplexity of a model on a token stream: non-overlapping windows, each scored from scratch.

Token t of a window is scored given tokens 0..t-1 of the same window (the first token of each window
is not scored), which is what llama.cpp's `perplexity` tool does with `--ctx-size window`.

On the model's own f32 K / V (`kv_cache_dtype` auto or float32) the window runs through the plain
causal forward (the same arithmetic as the engine's). Any other cache dtype (int8, fp8_e4m3, a
16-bit float) rounds every K and V the attention reads, which that forward never does, so such a
window runs through the engine's paged path instead: one prefill of the window into a paged cache
of that dtype, written then read back by the `paged_cpu` kernels as every engine step does (as
llama.cpp's `perplexity` reads its quantized cache).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import models
from continuous_batching.engine_config import KV_CACHE_DTYPES
from models.attention import paged_backend
from models.llama import forward
from paged_attention.kv_cache import cache_dtype, init_paged_kv_cache
from quantization.kv_int8 import check_folded_scales

FLOAT_CACHES = ("auto", "float32")  # kv_cache_dtype values whose cache stores the model's f32 K / V as they are


@functools.partial(jax.jit, static_argnames=("config",))
def _window_nll(params, tokens, *, config):
    """Summed negative log-likelihood of tokens[:, 1:] given their prefixes. tokens: i32[batch, window]."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = forward(params, tokens, positions, config=config)  # f32[batch, window, vocab]
    logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
    return -picked.sum()


def scoring_windows(token_ids: list[int], window: int, max_windows: int | None = None) -> np.ndarray:
    """i32[num_windows, window]: the consecutive `window`-token chunks of token_ids that are scored
    (at most `max_windows`; a partial last chunk is dropped)."""
    ids = np.asarray(token_ids, np.int32)
    num_windows = len(ids) // window
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    if num_windows == 0:
        raise ValueError(f"need at least window={window} tokens, got {len(ids)}")
    return ids[: num_windows * window].reshape(num_windows, window)


def nll_of_next_tokens(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Summed negative log-likelihood of tokens[1:] under logits[:-1] (f32[window, vocab], computed
    elsewhere, e.g. by llama.cpp), in float64."""
    logits = logits[:-1].astype(np.float64)
    peak = logits.max(-1, keepdims=True)
    log_norm = peak[:, 0] + np.log(np.exp(logits - peak).sum(-1))
    return float((log_norm - logits[np.arange(len(logits)), tokens[1:]]).sum())


def perplexity_of(total_nll: float, windows: np.ndarray) -> tuple[float, int]:
    """(perplexity, tokens scored) from the summed NLL over `windows` (every token but each first)."""
    scored = windows.shape[0] * (windows.shape[1] - 1)
    return math.exp(total_nll / scored), scored


@functools.partial(jax.jit, static_argnames=("config", "backend"))
def _paged_logits(params, tokens, kv_cache, metadata, *, config, backend):
    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    logits, _ = forward(params, tokens, positions, kv_cache, metadata, config=config, backend=backend)
    return logits  # f32[window, vocab]


def paged_window_logits(model: models.Model, window: np.ndarray, kv_cache_dtype: str,
                        backend: str = "paged_cpu", block_size: int = 16) -> np.ndarray:
    """f32[window, vocab]: the logits of one token window prefilled as one sequence into a fresh
    paged cache of `kv_cache_dtype` (its K / V written, then attended from the cache). An int8 cache
    needs the model's K / V scales folded in (`experiments.quant_calibration.with_calibrated_kv_scales`)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if kv_cache_dtype == "int8":
        check_folded_scales(model.params, "int8", "kv_cache_dtype")
    config, num_tokens = model.config, len(window)
    num_blocks = -(-num_tokens // block_size)
    metadata = paged_backend(backend).metadata_builder(block_size, num_blocks, config.num_kv_heads).build(
        [list(range(num_blocks))], [num_tokens], [num_tokens], num_prefill=1, prefill_tokens=num_tokens,
        prefill_seqs=1, decode_seqs=0, max_blocks=num_blocks)
    kv_cache = init_paged_kv_cache(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim,
                                   cache_dtype(kv_cache_dtype, model.dtype))
    return np.asarray(_paged_logits(model.params, jnp.asarray(window, jnp.int32), kv_cache, metadata,
                                    config=config, backend=backend))


def perplexity(model: models.Model, token_ids: list[int], window: int = 512, batch_size: int = 4,
               max_windows: int | None = None, kv_cache_dtype: str = "auto") -> tuple[float, int]:
    """(perplexity, tokens scored) over consecutive `window`-token chunks of token_ids, on a KV
    cache of `kv_cache_dtype` (module docstring)."""
    windows = scoring_windows(token_ids, window, max_windows)
    if kv_cache_dtype not in FLOAT_CACHES:
        total_nll = sum(nll_of_next_tokens(paged_window_logits(model, w, kv_cache_dtype), w) for w in windows)
        return perplexity_of(total_nll, windows)
    total_nll = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        total_nll += float(_window_nll(model.params, jnp.asarray(chunk), config=model.config))
    return perplexity_of(total_nll, windows)
