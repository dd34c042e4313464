"""What the engine returns each step (`Engine.step`): one `RequestOutput` per request that moved,
holding one `CompletionOutput` per sample (vLLM's `RequestOutput` / `CompletionOutput` shape)."""

from __future__ import annotations

import dataclasses

from continuous_batching.request import Status

FINISH_REASONS = {Status.FINISHED_STOPPED: "stop", Status.FINISHED_LENGTH: "length",
                  Status.FINISHED_ABORTED: "abort"}


@dataclasses.dataclass
class CompletionOutput:
    index: int  # which of the request's n samples (beam search: the beam's rank, 0 = best)
    token_ids: list[int]  # every token generated so far
    new_token_ids: list[int]  # the tokens this step added
    text: str | None  # detokenized output once finished (None before, or without a tokenizer)
    finish_reason: str | None  # None while running; "stop", "length" or "abort"
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None  # per token: (its lp, top-k (id, lp))
    cumulative_logprob: float | None = None  # beam search: the beam's summed raw log-probs


@dataclasses.dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
