"""The engine's settings, validated up front (host-side, JAX-free).

    policy           static | request_level | continuous | chunked_prefill (see `POLICIES`)
    reservation      request_level only: max | pow2 | oracle (Orca's rules, `reservation.py`)
    preemption       recompute | swap (paged policies; swap needs num_cpu_blocks > 0)
"""

from __future__ import annotations

import dataclasses

from continuous_batching.reservation import RESERVATIONS, reservation_tokens
from continuous_batching.sampling_params import check_known_keys
from continuous_batching.scheduler import PREEMPTION_MODES

POLICIES = {
    "static": "FasterTransformer: a fixed batch runs until every member finishes; KV reserved per batch "
              "(members x (longest prompt + largest max_tokens))",
    "request_level": "Orca: requests join and leave at every step, each reserves a contiguous region",
    "continuous": "vLLM: iteration-level scheduling on a paged KV cache, whole prompts per step",
    "chunked_prefill": "Sarathi / Dynamic SplitFuse / vLLM V1: prompts split to fill a token budget",
}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    policy: str = "continuous"
    reservation: str = "max"
    num_blocks: int = 512  # KV blocks on the device
    block_size: int = 16
    max_num_seqs: int = 64  # sequences per step
    max_num_batched_tokens: int = 2048  # tokens per step
    max_model_len: int = 2048  # prompt + output tokens of one sequence
    preemption: str = "recompute"
    num_cpu_blocks: int = 0  # swap space (blocks)
    enable_prefix_caching: bool = False
    backend: str = "paged_cpu"  # models.attention backend: paged_cpu (XLA CPU decode), paged (Pallas), paged_reference
    seed: int = 0  # requests without a seed get fold_in(key(seed), request id)

    def __post_init__(self) -> None:
        def check(field: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise ValueError(f"EngineConfig.{field} must be {allowed}, got {getattr(self, field)!r}")

        check("policy", self.policy in POLICIES, f"one of {sorted(POLICIES)}")
        check("reservation", self.reservation in RESERVATIONS, f"one of {list(RESERVATIONS)}")
        check("preemption", self.preemption in PREEMPTION_MODES, f"one of {list(PREEMPTION_MODES)}")
        check("backend", self.backend in ("paged_cpu", "paged", "paged_reference"),
              "one of 'paged_cpu', 'paged', 'paged_reference'")
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            check(name, isinstance(value, int) and not isinstance(value, bool) and value >= 1, "an int >= 1")
        check("num_cpu_blocks", isinstance(self.num_cpu_blocks, int) and self.num_cpu_blocks >= 0, "an int >= 0")
        check("num_cpu_blocks", self.preemption != "swap" or self.num_cpu_blocks > 0,
              "> 0 when preemption is 'swap'")
        check("enable_prefix_caching", isinstance(self.enable_prefix_caching, bool), "a bool")
        check("enable_prefix_caching", not (self.enable_prefix_caching and not self.paged),
              "False for the static and request_level policies (they do not share blocks)")
        check("seed", isinstance(self.seed, int), "an int")

    @property
    def paged(self) -> bool:
        return self.policy in ("continuous", "chunked_prefill")

    def kv_tokens_needed(self, prompt_len: int, max_tokens: int) -> int:
        """KV slots a request needs on its own: on pages and under static batching (a batch of one;
        batches reserve per batch, `reservation.py`) its prompt + output; request_level: the
        `reservation` rule."""
        if self.paged or self.policy == "static":
            return prompt_len + max_tokens
        return reservation_tokens(self.reservation, prompt_len, max_tokens, self.max_model_len)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @classmethod
    def from_dict(cls, data: dict) -> "EngineConfig":
        check_known_keys(cls, data, "engine setting")
        return cls(**data)
