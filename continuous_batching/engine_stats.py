"""Counters the engine keeps over its steps (vLLM's iteration stats), for the harness and
notebooks to read instead of the scheduler's internals. Host-side, JAX-free."""

from __future__ import annotations

import dataclasses

from continuous_batching.scheduler import Schedule


@dataclasses.dataclass
class EngineStats:
    num_steps: int = 0  # model steps run
    prefill_steps: int = 0  # steps that computed any prompt (or recompute) token
    scheduled_seqs: int = 0  # sequences over all steps (mean batch = scheduled_seqs / num_steps)
    prefill_tokens: int = 0  # prompt and recompute tokens computed
    decode_tokens: int = 0  # tokens computed one per sequence after their prompt
    last_plan: Schedule | None = None  # the last step's plan
    last_step_prefilled: bool = False

    def record(self, plan: Schedule) -> None:
        """Count one step's plan (before the step runs: a decode is a sequence's last sampled token)."""
        decode = sum(1 for p in plan.seqs if p.num_new_tokens == 1 and p.seq.output
                     and p.seq.num_computed == p.seq.num_tokens - 1)
        self.last_plan, self.last_step_prefilled = plan, decode < len(plan.seqs)
        self.num_steps += 1
        self.prefill_steps += self.last_step_prefilled
        self.scheduled_seqs += len(plan.seqs)
        self.decode_tokens += decode
        self.prefill_tokens += plan.num_tokens - decode
