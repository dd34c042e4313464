"""Per-request sampling parameters, as vLLM's `SamplingParams` / the OpenAI API define them.

Host-side and JAX-free: the engine validates a request's parameters in `add_request`, so a bad
value is rejected there with a message naming the field and its allowed values, and the engine keeps
serving every other request. Defaults follow vLLM (temperature 1.0, 16 tokens).
"""

from __future__ import annotations

import dataclasses
import math

MAX_BEAM_WIDTH = 10  # a round asks for 2 * beam_width raw log-probs; the runner returns 20


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_known_keys(cls, data: dict, what: str) -> None:
    """Raise ValueError naming unknown keys of `data` and the dataclass `cls`'s allowed fields."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; allowed: {allowed}")


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # independent samples of the prompt (share its KV blocks)
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output (1 = off)
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS (unless ignore_eos)
    stop: tuple[str, ...] = ()  # stop strings, matched on the detokenized output
    max_tokens: int = 16
    seed: int | None = None  # None: the engine's per-request default
    logprobs: int | None = None  # return the top-k log-probs of each generated token
    ignore_eos: bool = False
    beam_width: int = 1  # > 1: beam search (continuous_batching/beam_search.py), at most 10
    length_penalty: float = 1.0  # beam search: rank by cum_logprob / output_len ** length_penalty

    def __post_init__(self) -> None:
        checks = [
            ("n", _int(self.n) and self.n >= 1, "an int >= 1"),
            ("temperature", _number(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_k", _int(self.top_k) and self.top_k >= 0, "an int >= 0 (0 = off)"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("repetition_penalty", _number(self.repetition_penalty) and self.repetition_penalty > 0,
             "a number > 0 (1 = off)"),
            ("presence_penalty", _number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "a number in [-2, 2]"),
            ("frequency_penalty", _number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "a number in [-2, 2]"),
            ("stop_token_ids", isinstance(self.stop_token_ids, tuple)
             and all(_int(t) and t >= 0 for t in self.stop_token_ids), "a tuple of token ids >= 0"),
            ("stop", isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
             "a tuple of non-empty strings"),
            ("max_tokens", _int(self.max_tokens) and self.max_tokens >= 1, "an int >= 1"),
            ("seed", self.seed is None or _int(self.seed), "None or an int"),
            ("logprobs", self.logprobs is None or (_int(self.logprobs) and 0 <= self.logprobs <= 20),
             "None or an int in [0, 20]"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "a bool"),
            ("beam_width", _int(self.beam_width) and 1 <= self.beam_width <= MAX_BEAM_WIDTH,
             f"an int in [1, {MAX_BEAM_WIDTH}] (2 * beam_width log-probs, at most 20)"),
            ("length_penalty", _number(self.length_penalty), "a finite number"),
        ]
        for field, ok, allowed in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{field} must be {allowed}, got {getattr(self, field)!r}")
        if self.beam_width > 1:
            self._check_beam_search()

    def _check_beam_search(self) -> None:
        """What beam search (beam_width > 1) needs, and what it does not combine with, each refused
        by name (kept simple and explicit)."""
        if self.temperature != 0 or self.top_k or self.top_p < 1:
            raise ValueError("SamplingParams.beam_width > 1 (beam search) needs temperature=0 and no "
                             f"top_k/top_p, got temperature={self.temperature!r}, top_k={self.top_k!r}, "
                             f"top_p={self.top_p!r}")
        if self.n > self.beam_width:
            raise ValueError(f"SamplingParams.n ({self.n}) must be <= beam_width ({self.beam_width}): "
                             "beam search returns at most beam_width sequences")
        refused = [("repetition_penalty", self.repetition_penalty != 1, "1 (off)"),
                   ("presence_penalty", self.presence_penalty != 0, "0 (off)"),
                   ("frequency_penalty", self.frequency_penalty != 0, "0 (off)"),
                   ("stop", bool(self.stop), "() (use stop_token_ids)"),
                   ("logprobs", self.logprobs is not None, "None (beams return cumulative_logprob)")]
        for field, bad, allowed in refused:
            if bad:
                raise ValueError(f"SamplingParams.{field} must be {allowed} with beam search (beam_width > 1), "
                                 f"got {getattr(self, field)!r}")

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError unless every stop token id is in the model's vocabulary [0, vocab_size)
        (the engine calls this in `add_request`, where the vocabulary is known)."""
        outside = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if outside:
            raise ValueError(f"SamplingParams.stop_token_ids must be token ids in [0, {vocab_size}) (the "
                             f"model's vocabulary), got {outside} outside it")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p is active (as `models.sampling.SamplingConfig.filters`)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        """From a plain dict (e.g. an API request); unknown keys name the allowed ones."""
        check_known_keys(cls, data, "sampling parameter")
        data = {k: tuple(v) if k in ("stop_token_ids", "stop") and isinstance(v, list) else v
                for k, v in data.items()}
        return cls(**data)
