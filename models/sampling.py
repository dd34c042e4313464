"""Token sampling on device: greedy, temperature, top-k, top-p, with per-row parameters.

Each row carries its own parameters and its own PRNG key (derived from the request's seed and the
number of tokens it has generated), so a request samples the same tokens whatever else shares its
batch. Order of filters follows HF transformers: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """One request's sampling settings. temperature 0 means greedy; top_k 0 / top_p 1 mean off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p is active (these need a sort of the vocabulary)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


def request_key(seed: int, row_id: int) -> np.ndarray:
    """A request's raw PRNG key (u32[2]): `fold_in(key(seed), row_id)`."""
    return np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), row_id)), np.uint32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-row sampling parameters on device."""

    temperature: jax.Array  # f32[batch]
    top_k: jax.Array  # i32[batch], 0 = off
    top_p: jax.Array  # f32[batch], 1 = off
    keys: jax.Array  # u32[batch, 2], one raw PRNG key per row (request)

    @classmethod
    def from_configs(cls, configs: list[SamplingConfig], row_ids: list[int] | None = None) -> "SamplingArrays":
        """Stack per-request settings; row_ids (default 0..n-1) make each row's key distinct."""
        row_ids = list(range(len(configs))) if row_ids is None else row_ids
        keys = np.stack([request_key(c.seed, r) for c, r in zip(configs, row_ids)])
        return cls(temperature=jnp.asarray([c.temperature for c in configs], jnp.float32),
                   top_k=jnp.asarray([c.top_k for c in configs], jnp.int32),
                   top_p=jnp.asarray([c.top_p for c in configs], jnp.float32),
                   keys=jnp.asarray(keys, jnp.uint32))


def _filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask (to -inf) tokens outside each row's top-k and top-p nucleus. logits: f32[batch, vocab]."""
    vocab = logits.shape[-1]
    sorted_logits = -jnp.sort(-logits, axis=-1)  # f32[batch, vocab], descending
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    sorted_logits = jnp.where(rank < k, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
    keep_sorted = (rank < k) & ((mass_before < top_p[:, None]) | (rank == 0))
    # The smallest kept logit is each row's threshold; ties at the threshold are kept.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


SAMPLING_KINDS = ("greedy", "random", "filtered")


def sampling_kind(configs: list[SamplingConfig]) -> str:
    """The cheapest `sample` kind that serves every row: a static jit argument, so a batch of greedy
    rows never pays for random numbers over the vocabulary, nor an unfiltered one for a sort."""
    if all(c.greedy for c in configs):
        return "greedy"
    return "filtered" if any(c.filters for c in configs) else "random"


ARGMAX_BLOCK = 512  # vocab entries per block of `blocked_argmax`


def blocked_argmax(logits: jax.Array, block: int = ARGMAX_BLOCK) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum; the first NaN if any), as plain reductions:
    each block's max, the first block holding the row's max, then the first max inside that block.
    XLA CPU runs argmax's (value, index) reduce as a scalar loop (~7 ms for 64 rows of SmolLM2's
    49,152 logits); these reductions vectorize (~1 ms). That vectorized max may drop a NaN, so a
    batch whose row sums are not all finite (a NaN or an infinite logit: a broken model, or masked
    logits) takes plain argmax instead. logits f32[..., vocab] -> i32[...]."""
    vocab = logits.shape[-1]
    padded = -(-vocab // block) * block
    blocks = logits
    if padded != vocab:  # -inf padding never beats a real entry, and loses ties to it (it comes later)
        blocks = jnp.pad(logits, [(0, 0)] * (logits.ndim - 1) + [(0, padded - vocab)], constant_values=-jnp.inf)
    blocks = blocks.reshape(*logits.shape[:-1], padded // block, block)  # f32[..., num_blocks, block]

    def by_blocks():
        best_block = jnp.argmax(blocks.max(-1), axis=-1)  # i[...]: the first block holding the row's max
        inside = jnp.take_along_axis(blocks, best_block[..., None, None], axis=-2)[..., 0, :]  # f32[..., block]
        return (best_block * block + jnp.argmax(inside, axis=-1)).astype(jnp.int32)

    return lax.cond(jnp.isfinite(logits.sum(-1)).all(), by_blocks,
                    lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def sample(logits: jax.Array, params: SamplingArrays, step: jax.Array, *, kind: str = "filtered") -> jax.Array:
    """Pick one token per row. logits: f32[batch, vocab]; step: i32[batch], tokens generated so far.

    kind (static): "greedy" (argmax only), "random" (temperature sampling, no top-k/top-p) or
    "filtered" (everything). Each row still follows its own parameters within the kind.
    Returns i32[batch].
    """
    if kind not in SAMPLING_KINDS:
        raise ValueError(f"sampling kind must be one of {SAMPLING_KINDS}, got {kind!r}")
    greedy_tokens = blocked_argmax(logits)
    if kind == "greedy":
        return greedy_tokens
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    scaled = logits / temperature
    if kind == "filtered":
        scaled = _filter_top_k_top_p(scaled, params.top_k, params.top_p)
    keys = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(params.keys, step)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(params.temperature > 0, sampled, greedy_tokens)
