"""A model step between `PagedModelRunner.prepare` and its result: the host inputs prepared for one
shape, where each sequence's row is, and the tokens (and log-probs) read back out of the rows."""

from __future__ import annotations

import dataclasses

import numpy as np

from continuous_batching.sampler import SamplerFlags
from continuous_batching.step_shapes import StepShape


@dataclasses.dataclass(frozen=True)
class PreparedStep:
    shape: StepShape  # the (bucketed or covering) shape the step runs at
    flags: SamplerFlags
    inputs: tuple  # host arrays: (tokens, positions, metadata, logits_indices, sampler inputs, rope)
    rows: list[int]  # each given sequence's row in the step's outputs


@dataclasses.dataclass(frozen=True)
class StepResult:
    tokens: list[int]  # each sequence's sampled next token
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None  # (sampled lp, top-20) per sequence


def split_evenly(items: list, parts: int) -> list[list]:
    """`items` cut into min(parts, len(items)) contiguous, non-empty runs whose lengths differ by <= 1."""
    parts = max(1, min(parts, len(items)))
    bounds = np.linspace(0, len(items), parts + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def step_result(prepared: PreparedStep, next_tokens: np.ndarray, logprobs) -> StepResult:
    """The prepared sequences' tokens (and log-probs) out of a step's rows, in the order given."""
    host_lp = None if logprobs is None else _host_logprobs(logprobs, len(next_tokens))
    return StepResult([int(next_tokens[r]) for r in prepared.rows],
                      None if host_lp is None else [host_lp[r] for r in prepared.rows])


def _host_logprobs(logprobs, num_seqs: int) -> list[tuple[float, list[tuple[int, float]]]]:
    chosen, top_logp, top_ids = (np.asarray(x)[:num_seqs] for x in logprobs)
    return [(float(c), list(zip(ids.tolist(), lp.tolist()))) for c, lp, ids in zip(chosen, top_logp, top_ids)]
