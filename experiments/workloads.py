"""Workloads: which requests arrive (prompt tokens, output length) and when (arrival time).

- `sharegpt`: real (prompt, answer) pairs from ShareGPT_V3, tokenized with the model's tokenizer;
  the answer's token count is the request's output length (as in vLLM's benchmarks). Filtered like
  vLLM's sampler: prompt and answer >= 4 tokens, prompt <= 1024, prompt + answer <= 2048.
- `alpaca`: synthetic lengths with the Alpaca means the vLLM paper reports (19 prompt / 58 output
  tokens), gamma-distributed, random token ids.
- `fixed`: every request has exactly `max_prompt_len` random prompt tokens and `max_output_len`
  output tokens (e.g. long prompts with short answers, for chunked prefill).
`shared_prefix_len` puts the same random tokens before every prompt (a few-shot preamble or system
prompt: what prefix caching reuses).
Arrivals are a Poisson process at `request_rate` (exponential gaps), or all at t=0 for `inf`.
Every draw comes from one seeded numpy Generator, so a workload is reproducible.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from experiments.config import WorkloadConfig
from experiments.datasets import sharegpt_pairs

ALPACA_MEAN_PROMPT, ALPACA_MEAN_OUTPUT = 19.31, 58.45
ALPACA_GAMMA_SHAPE = 2.0  # spread of the synthetic lengths (coefficient of variation 0.71)


@dataclasses.dataclass(frozen=True)
class Request:
    request_id: int
    prompt: tuple[int, ...]
    output_len: int  # tokens to generate (EOS ignored, as benchmarks do)
    arrival_s: float  # seconds after the run starts


def arrival_times(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson arrivals at `rate` requests/s (first at t=0 when rate is inf)."""
    if math.isinf(rate):
        return np.zeros(n)
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


def sharegpt_lengths_and_prompts(tokenizer, n: int, rng: np.random.Generator,
                                 max_prompt_len: int | None, max_output_len: int | None):
    """Sample n ShareGPT pairs (without replacement) -> (prompt ids, output_len) after filtering."""
    pairs = sharegpt_pairs()
    picked = []
    for index in rng.permutation(len(pairs)):
        prompt_text, answer_text = pairs[index]
        prompt = tokenizer(prompt_text, add_special_tokens=False).input_ids
        output_len = len(tokenizer(answer_text, add_special_tokens=False).input_ids)
        if len(prompt) < 4 or output_len < 4 or len(prompt) > 1024 or len(prompt) + output_len > 2048:
            continue
        if max_prompt_len is not None:
            prompt = prompt[:max_prompt_len]
        if max_output_len is not None:
            output_len = min(output_len, max_output_len)
        picked.append((tuple(prompt), output_len))
        if len(picked) == n:
            return picked
    raise ValueError(f"workload.num_requests={n} exceeds the {len(picked)} usable ShareGPT pairs")


def alpaca_lengths_and_prompts(vocab_size: int, n: int, rng: np.random.Generator,
                               max_prompt_len: int | None, max_output_len: int | None):
    """Synthetic Alpaca-like requests: gamma lengths with the paper's means, random token ids."""
    scale = 1.0 / ALPACA_GAMMA_SHAPE
    prompt_lens = np.maximum(1, np.rint(rng.gamma(ALPACA_GAMMA_SHAPE, ALPACA_MEAN_PROMPT * scale, n)))
    output_lens = np.maximum(1, np.rint(rng.gamma(ALPACA_GAMMA_SHAPE, ALPACA_MEAN_OUTPUT * scale, n)))
    if max_prompt_len is not None:
        prompt_lens = np.minimum(prompt_lens, max_prompt_len)
    if max_output_len is not None:
        output_lens = np.minimum(output_lens, max_output_len)
    low = min(100, vocab_size // 2)  # stay clear of special tokens at the start of the vocabulary
    return [(tuple(rng.integers(low, vocab_size, int(p)).tolist()), int(o))
            for p, o in zip(prompt_lens, output_lens)]


def build_workload(config: WorkloadConfig, *, tokenizer=None, vocab_size: int) -> list[Request]:
    """The requests of a workload, sorted by arrival time."""
    rng = np.random.default_rng(config.seed)
    if config.kind == "sharegpt":
        if tokenizer is None:
            raise ValueError("workload.kind 'sharegpt' needs a model with a tokenizer "
                             "(e.g. model: smollm2-135m); use kind 'alpaca' for random-weight models")
        items = sharegpt_lengths_and_prompts(tokenizer, config.num_requests, rng,
                                             config.max_prompt_len, config.max_output_len)
    elif config.kind == "fixed":
        low = min(100, vocab_size // 2)
        items = [(tuple(rng.integers(low, vocab_size, config.max_prompt_len).tolist()), config.max_output_len)
                 for _ in range(config.num_requests)]
    else:
        items = alpaca_lengths_and_prompts(vocab_size, config.num_requests, rng,
                                           config.max_prompt_len, config.max_output_len)
    if config.shared_prefix_len:
        low = min(100, vocab_size // 2)
        prefix = tuple(rng.integers(low, vocab_size, config.shared_prefix_len).tolist())
        items = [(prefix + prompt, out) for prompt, out in items]
    arrivals = arrival_times(config.num_requests, config.request_rate, rng)
    return [Request(i, prompt, out, float(t)) for i, ((prompt, out), t) in enumerate(zip(items, arrivals))]


def describe(requests: list[Request]) -> dict:
    """Summary statistics recorded with the results."""
    prompts = np.array([len(r.prompt) for r in requests])
    outputs = np.array([r.output_len for r in requests])
    return {"num_requests": len(requests), "mean_prompt_len": float(prompts.mean()),
            "mean_output_len": float(outputs.mean()), "max_prompt_len": int(prompts.max()),
            "max_output_len": int(outputs.max()), "last_arrival_s": float(requests[-1].arrival_s)}
