"""Request / sequence state for the engine: host-side, JAX-free.

A sequence's tokens are its prompt followed by its output. `num_computed` counts the leading tokens
whose K/V is in the cache; the scheduler hands the rest to the model, a chunk at a time. The last
output token is never computed when it is sampled: the next step computes it and samples the one
after (so a decode step has exactly one uncomputed token).
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


@dataclasses.dataclass
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
    key: object = None  # the request's raw PRNG key (u32[2] numpy), set by the engine

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def append_output(self, token: int) -> None:
        """Record a sampled token and finish the sequence if it stops here."""
        self.output.append(token)
        if token in self.stop_token_ids:
            self.status = Status.FINISHED_STOPPED
        elif len(self.output) >= self.max_tokens:
            self.status = Status.FINISHED_LENGTH
