"""Perplexity of a model on a token stream: non-overlapping windows, each scored from scratch.

Token t of a window is scored given tokens 0..t-1 of the same window (the first token of each window
is not scored), which is what llama.cpp's `perplexity` tool does with `--ctx-size window`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import models
from models.llama import forward


@functools.partial(jax.jit, static_argnames=("config",))
def _window_nll(params, tokens, *, config):
    """Summed negative log-likelihood of tokens[:, 1:] given their prefixes. tokens: i32[batch, window]."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = forward(params, tokens, positions, config=config)  # f32[batch, window, vocab]
    logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
    return -picked.sum()


def perplexity(model: models.Model, token_ids: list[int], window: int = 512, batch_size: int = 4,
               max_windows: int | None = None) -> tuple[float, int]:
    """(perplexity, tokens scored) over consecutive `window`-token chunks of token_ids."""
    ids = np.asarray(token_ids, np.int32)
    num_windows = len(ids) // window
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    if num_windows == 0:
        raise ValueError(f"need at least window={window} tokens, got {len(ids)}")
    windows = ids[: num_windows * window].reshape(num_windows, window)
    total_nll = 0.0
    for start in range(0, num_windows, batch_size):
        chunk = windows[start:start + batch_size]
        total_nll += float(_window_nll(model.params, jnp.asarray(chunk), config=model.config))
    scored = num_windows * (window - 1)
    return math.exp(total_nll / scored), scored
