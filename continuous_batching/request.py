"""Sequence state for the engine: host-side, JAX-free. One `Sequence` carries everything about one
generation stream through the pipeline (nano-vllm's `Sequence`): the scheduler plans it, the block
manager gives it blocks, the model runner reads it directly, and the engine finds its request on it.

A sequence's tokens are its prompt followed by its output. `num_computed` counts the leading tokens
whose K/V is in the cache; the scheduler hands the rest to the model, a chunk at a time: in the
step being run, tokens [num_computed, num_computed + num_new_tokens) go in (`new_tokens`) and the
sequence samples when that chunk reaches its last token. The last output token is never
computed when it is sampled: the next step computes it and samples the one after (so a decode step
has exactly one uncomputed token).
"""

from __future__ import annotations

import dataclasses
import enum


class Status(enum.Enum):
    WAITING = "waiting"  # not in the cache (new, or preempted by recompute)
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted by swapping: its blocks wait in the CPU pool
    FINISHED_STOPPED = "finished_stopped"  # EOS or a stop token
    FINISHED_LENGTH = "finished_length"  # max_tokens reached
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self.value.startswith("finished")


@dataclasses.dataclass(eq=False)  # identity: the scheduler's queues hold and remove this very object
class Sequence:
    seq_id: int
    prompt: list[int]
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    arrival_s: float = 0.0
    output: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0
    num_preemptions: int = 0
    key: object = None  # the request's raw PRNG key (u32[2] numpy), set by the engine; None: zeros
    params: object = None  # the SamplingParams the runner samples it with (None: greedy)
    request: object = None  # the engine's request it belongs to (opaque here)
    index: int = 0  # which of its request's sequences (sample index, or beam)
    block_table: list[int] = dataclasses.field(default_factory=list)  # its blocks, set when scheduled
    num_new_tokens: int = 0  # tokens the current step computes, from num_computed on

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def context_len(self) -> int:
        """Tokens in the cache once the current step has run."""
        return self.num_computed + self.num_new_tokens

    @property
    def new_tokens(self) -> list[int]:
        """The tokens the current step computes."""
        start, num_prompt = self.num_computed, len(self.prompt)
        if start >= num_prompt:
            return self.output[start - num_prompt:start - num_prompt + self.num_new_tokens]
        return self.tokens[start:start + self.num_new_tokens]

    @classmethod
    def in_cache(cls, block_table: list[int], context_len: int, new_tokens: list[int], **fields) -> "Sequence":
        """A sequence whose first `context_len - len(new_tokens)` tokens are already in the cache
        (their ids unknown here: zeros) and whose current step brings `new_tokens`: for driving the
        model runner directly (benchmarks, tests)."""
        num_cached = context_len - len(new_tokens)
        return cls(-1, [0] * num_cached + list(new_tokens), max_tokens=1, num_computed=num_cached,
                   block_table=list(block_table), num_new_tokens=len(new_tokens), **fields)

    def advance(self, token: int | None) -> None:
        """After its step ran: the step's tokens are in the cache, and `token` (None: the chunk did
        not reach the end, nothing was sampled) is recorded."""
        self.num_computed += self.num_new_tokens
        self.num_new_tokens = 0
        if token is not None:
            self.append_output(token)

    def append_output(self, token: int) -> None:
        """Record a sampled token and finish the sequence if it stops here."""
        self.output.append(token)
        if token in self.stop_token_ids:
            self.status = Status.FINISHED_STOPPED
        elif len(self.output) >= self.max_tokens:
            self.status = Status.FINISHED_LENGTH
