"""On-device sampling for the engine: penalties, then `models.sampling.sample` (temperature, top-k,
top-p, per-request PRNG streams), plus the log-probs a request asks for.

Everything runs inside the model step's jit, so only `num_seqs` token ids (and, when asked, top-k
log-probs) come back to the host. Which parts are traced is decided by static flags, so a batch of
plain greedy requests compiles to an argmax and pays for nothing else.

Penalties follow vLLM: `repetition_penalty` (CTRL) divides positive logits / multiplies negative
ones of every token seen in the prompt or the output; `frequency_penalty` subtracts per occurrence
in the output, `presence_penalty` once for any occurrence in the output. Log-probs are those of the
model's raw distribution (`log_softmax(logits)`, before penalties and temperature), as vLLM returns.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from continuous_batching.sampling_params import SamplingParams
from models.sampling import SamplingArrays, sample, sampling_kind
from paged_attention.buckets import pow2_at_least

MAX_LOGPROBS = 20  # SamplingParams.logprobs is at most this: one static top-k for every request


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerInputs:
    """Per-row sampling state on device, padded to the step's sequence bucket."""

    arrays: SamplingArrays  # temperature / top_k / top_p / keys, each [num_seqs]
    step: jax.Array  # i32[num_seqs]: tokens generated so far (folded into the key)
    repetition: jax.Array  # f32[num_seqs]
    presence: jax.Array  # f32[num_seqs]
    frequency: jax.Array  # f32[num_seqs]
    prompt_tokens: jax.Array  # i32[num_seqs, prompt_bucket], -1 = padding (only with penalties)
    output_tokens: jax.Array  # i32[num_seqs, output_bucket], -1 = padding (only with penalties)


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    """Static (jit) choices for one step."""

    kind: str  # models.sampling kind: greedy / random / filtered
    penalties: bool
    logprobs: bool

    @classmethod
    def for_params(cls, params: list[SamplingParams]) -> "SamplerFlags":
        """The cheapest flags that serve every row."""
        kind = sampling_kind(params)  # SamplingParams has the .greedy / .filters it reads
        penalties = any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params)
        return cls(kind, penalties, any(p.logprobs is not None for p in params))


def _pad_rows(rows: list[list[int]], num_rows: int) -> np.ndarray:
    """Ragged token lists -> i32[num_rows, pow2 width], -1 padded."""
    width = pow2_at_least(max((len(r) for r in rows), default=1))
    out = np.full((num_rows, max(width, 1)), -1, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def build_inputs(params: list[SamplingParams], keys: list[np.ndarray], steps: list[int],
                 histories: list[tuple[list[int], list[int]]] | None, num_rows: int) -> SamplerInputs:
    """Host lists (one entry per real row) -> padded inputs as numpy arrays (the runner moves them
    to the device with the rest of the step). `histories` (prompt, output) token lists are needed
    only when a row uses penalties."""
    pad = num_rows - len(params)
    padded = params + [SamplingParams(temperature=0)] * pad
    key_rows = np.stack(keys + [np.zeros(2, np.uint32)] * pad)
    arrays = SamplingArrays(temperature=np.asarray([p.temperature for p in padded], np.float32),
                            top_k=np.asarray([p.top_k for p in padded], np.int32),
                            top_p=np.asarray([p.top_p for p in padded], np.float32),
                            keys=np.asarray(key_rows, np.uint32))
    if histories is None:
        prompt = output = np.full((num_rows, 1), -1, np.int32)
    else:
        prompt = _pad_rows([h[0] for h in histories], num_rows)
        output = _pad_rows([h[1] for h in histories], num_rows)
    return SamplerInputs(arrays, np.asarray(steps + [0] * pad, np.int32),
                         np.asarray([p.repetition_penalty for p in padded], np.float32),
                         np.asarray([p.presence_penalty for p in padded], np.float32),
                         np.asarray([p.frequency_penalty for p in padded], np.float32), prompt, output)


def _token_counts(tokens: jax.Array, vocab: int) -> jax.Array:
    """i32[rows, n] token ids (-1 = padding) -> f32[rows, vocab] occurrence counts."""
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    tokens = jnp.where(tokens < 0, vocab, tokens)  # padding out of range, dropped (-1 would wrap)
    return jnp.zeros((tokens.shape[0], vocab), jnp.float32).at[rows, tokens].add(1.0, mode="drop")


def apply_penalties(logits: jax.Array, inputs: SamplerInputs) -> jax.Array:
    """f32[rows, vocab] -> penalized logits (see the module docstring)."""
    vocab = logits.shape[-1]
    output_counts = _token_counts(inputs.output_tokens, vocab)
    seen = (output_counts > 0) | (_token_counts(inputs.prompt_tokens, vocab) > 0)
    rep = inputs.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - inputs.frequency[:, None] * output_counts
    return logits - inputs.presence[:, None] * (output_counts > 0)


def sample_tokens(logits: jax.Array, inputs: SamplerInputs, flags: SamplerFlags):
    """logits f32[rows, vocab] -> (i32[rows] tokens, logprobs or None). With `flags.logprobs`, the
    second item is (f32[rows] sampled token's log-prob, f32[rows, 20] top log-probs, i32[rows, 20]
    their token ids)."""
    raw = logits
    if flags.penalties:
        logits = apply_penalties(logits, inputs)
    tokens = sample(logits, inputs.arrays, inputs.step, kind=flags.kind)
    if not flags.logprobs:
        return tokens, None
    logp = jax.nn.log_softmax(raw, axis=-1)
    top_logp, top_ids = jax.lax.top_k(logp, MAX_LOGPROBS)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    return tokens, (chosen, top_logp, top_ids.astype(jnp.int32))
