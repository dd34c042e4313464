"""The engine's settings, validated up front (host-side, JAX-free).

Each technique is a setting of its own, and the four named policies are presets over the first three:

    admission        batch (a batch runs until every member finishes) | iteration (join and leave
                     at every step, Orca)
    kv_memory        reserved (one contiguous region per request, sized at admission by
                     `reservation`; per batch under batch admission) | paged (blocks on demand, vLLM)
    chunked_prefill  split prompts over steps to fill the token budget (Sarathi / Dynamic SplitFuse)
    enable_prefix_caching   paged only: equal prompt prefixes share their full blocks
    reservation      reserved iteration-level memory: max | pow2 | oracle (Orca's rules, `reservation.py`)
    preemption       recompute | swap (paged; swap needs num_cpu_blocks > 0)
    backend          the attention path: paged_cpu (XLA on CPU) | paged (Pallas) | paged_reference (jnp)
    kernels          the model's ops set (`models/ops.py`): unfused (one program per op) | xla (one
                     program per step) | pallas (fused kernels), or an Ops instance
    kv_cache_dtype   auto (the model's dtype) | float32 | bfloat16 | float16 | fp8_e4m3 (FP8, unscaled)
                     | int8 (the model's params must carry folded K / V scales: `quantization/kv_int8.py`)
    calculate_kv_scales  fp8_e4m3 only: the cache stores K / V in units of calibrated per-layer,
                     per-KV-head scales (absmax / 448, vLLM's k_scale / v_scale) folded into the
                     params (`quantization/kv_int8.fold_kv_scales`; the harness calibrates them)
    mesh             None, or a jax.sharding.Mesh to run on: params and cache split Megatron-style
                     over its "tp" axis (`distributed.make_mesh`, `distributed/tensor_parallel.py`),
                     replicated over a mesh without one; inputs replicated
    tp, pp           tensor-parallel degree and pipeline stages without a mesh: tp x pp > 1 runs on
                     `make_mesh(tp=tp, pp=pp)`, the first tp x pp of jax.devices() (on CPU, fake
                     devices: XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts
                     its backend); pp > 1 cuts each step into pp micro-batches
                     (`pipeline_runner.py`) and needs num_cpu_blocks 0
    offload_layers   one device only: the last N layers' weights stay in host memory and come in
                     when their layer runs (ZeRO-Inference; llama.cpp's -ngl = num_layers - N;
                     `distributed/offload.py`)

    policy           static | request_level | continuous | chunked_prefill (`POLICIES`): a preset
                     for admission, kv_memory and chunked_prefill; a setting given beside it must
                     agree with it. Without a policy, unset ones take `continuous`'s values.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from continuous_batching.reservation import RESERVATIONS, reservation_tokens
from continuous_batching.sampling_params import check_known_keys
from continuous_batching.scheduler import PREEMPTION_MODES
from paged_attention.backend_names import PAGED_BACKENDS

KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8_e4m3", "int8")
KERNEL_SETS = ("unfused", "xla", "pallas")  # the names in models.ops.OPS_SETS (this module stays JAX-free; a test keeps them equal)
ADMISSIONS = ("batch", "iteration")
KV_MEMORIES = ("reserved", "paged")


class Policy(NamedTuple):
    admission: str
    kv_memory: str
    chunked_prefill: bool
    description: str

    @property
    def settings(self) -> tuple[str, str, bool]:
        return self.admission, self.kv_memory, self.chunked_prefill


POLICIES = {
    "static": Policy("batch", "reserved", False, "FasterTransformer: a fixed batch runs until every member "
                     "finishes; KV reserved per batch (members x (longest prompt + largest max_tokens))"),
    "request_level": Policy("iteration", "reserved", False, "Orca: requests join and leave at every step, "
                            "each reserves a contiguous region"),
    "continuous": Policy("iteration", "paged", False, "vLLM: iteration-level scheduling on a paged KV cache, "
                         "whole prompts per step"),
    "chunked_prefill": Policy("iteration", "paged", True, "Sarathi / Dynamic SplitFuse / vLLM V1: prompts "
                              "split to fill a token budget"),
}


class EngineConfigError(ValueError):
    """A bad engine setting; `field` names it (the harness reports it under its own YAML key)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    policy: str | None = None  # a preset (POLICIES); None: the settings below, unset ones as `continuous`
    admission: str | None = None  # batch | iteration
    kv_memory: str | None = None  # reserved | paged
    chunked_prefill: bool | None = None
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
    kernels: object = "xla"  # the model's ops set (models.ops.OPS_SETS name, or an Ops instance)
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | float32 | bfloat16 | float16 | fp8_e4m3 | int8
    calculate_kv_scales: bool = False  # fp8_e4m3: K / V in calibrated scales folded into the params
    mesh: object = None  # placement: a jax.sharding.Mesh the runner puts params, cache and inputs on
    tp: int = 1  # without a mesh: tp x pp > 1 runs on distributed.make_mesh(tp=tp, pp=pp)
    pp: int = 1  # pipeline stages (continuous_batching/pipeline_runner.py)
    offload_layers: int = 0  # last layers whose weights stay in host memory (distributed/offload.py)
    seed: int = 0  # requests without a seed get fold_in(key(seed), request id)

    def __post_init__(self) -> None:
        def check(field: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise EngineConfigError(field, f"EngineConfig.{field} must be {allowed}, got {getattr(self, field)!r}")

        check("policy", self.policy is None or self.policy in POLICIES, f"one of {sorted(POLICIES)} (or None)")
        check("admission", self.admission in (None, *ADMISSIONS), f"one of {list(ADMISSIONS)}")
        check("kv_memory", self.kv_memory in (None, *KV_MEMORIES), f"one of {list(KV_MEMORIES)}")
        check("chunked_prefill", self.chunked_prefill in (None, True, False), "a bool")
        if self.policy is not None:
            for field, preset, given in zip(("admission", "kv_memory", "chunked_prefill"),
                                            POLICIES[self.policy].settings, self._given):
                check(field, given is None or given == preset,
                      f"{preset!r} (or unset) under policy {self.policy!r}, which sets it")
        check("reservation", self.reservation in RESERVATIONS, f"one of {list(RESERVATIONS)}")
        check("preemption", self.preemption in PREEMPTION_MODES, f"one of {list(PREEMPTION_MODES)}")
        check("backend", self.backend in PAGED_BACKENDS, f"one of {list(PAGED_BACKENDS)}")
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                     "tp", "pp"):
            value = getattr(self, name)
            check(name, isinstance(value, int) and not isinstance(value, bool) and value >= 1, "an int >= 1")
        check("num_cpu_blocks", isinstance(self.num_cpu_blocks, int) and self.num_cpu_blocks >= 0, "an int >= 0")
        check("num_cpu_blocks", self.preemption != "swap" or self.num_cpu_blocks > 0,
              "> 0 when preemption is 'swap'")
        check("enable_prefix_caching", isinstance(self.enable_prefix_caching, bool), "a bool")
        check("enable_prefix_caching", not (self.enable_prefix_caching and not self.paged),
              "False on reserved KV memory (the static and request_level policies do not share blocks)")
        check("chunked_prefill", not (self.chunks_prompts and self.batch_admission),
              "False under batch admission (a static batch prefills its prompts whole)")
        check("seed", isinstance(self.seed, int), "an int")
        check("kv_cache_dtype", self.kv_cache_dtype in KV_CACHE_DTYPES, f"one of {list(KV_CACHE_DTYPES)}")
        check("calculate_kv_scales", isinstance(self.calculate_kv_scales, bool), "a bool")
        check("calculate_kv_scales", not self.calculate_kv_scales or self.kv_cache_dtype == "fp8_e4m3",
              "False unless kv_cache_dtype is 'fp8_e4m3' (an int8 cache is always scaled, a float one needs none)")
        check("kernels", not isinstance(self.kernels, str) or self.kernels in KERNEL_SETS,
              f"one of {list(KERNEL_SETS)} (or a models.ops.Ops instance)")
        check("mesh", self.mesh is None or hasattr(self.mesh, "axis_names"), "None or a jax.sharding.Mesh")
        check("tp", self.tp == 1 or self.mesh is None, "1 when a mesh is given (the mesh sets the degrees)")
        check("pp", self.pp == 1 or self.mesh is None, "1 when a mesh is given (the mesh sets the degrees)")
        check("num_cpu_blocks", self.pp == 1 or self.num_cpu_blocks == 0,
              "0 with pp > 1 (swapping is not supported across pipeline stages)")
        check("offload_layers", isinstance(self.offload_layers, int) and not isinstance(self.offload_layers, bool)
              and self.offload_layers >= 0, "an int >= 0")
        check("offload_layers", self.offload_layers == 0 or (self.mesh is None and self.tp * self.pp == 1),
              "0 on a mesh (offload places weights for one device: tp = pp = 1, no mesh)")

    @property
    def _given(self) -> tuple:
        return self.admission, self.kv_memory, self.chunked_prefill

    @property
    def settings(self) -> tuple[str, str, bool]:
        """(admission, kv_memory, chunked_prefill) after the preset: the policy's, or the given
        ones with `continuous`'s values for those unset."""
        if self.policy is not None:
            return POLICIES[self.policy].settings
        return tuple(d if g is None else g for g, d in zip(self._given, POLICIES["continuous"].settings))

    @property
    def name(self) -> str:
        """The preset these settings amount to (e.g. for progress bars), or a description."""
        for name, policy in POLICIES.items():
            if policy.settings == self.settings:
                return name
        admission, kv_memory, chunked = self.settings
        return f"{admission}+{kv_memory}" + ("+chunked" if chunked else "")

    @property
    def paged(self) -> bool:
        return self.settings[1] == "paged"

    @property
    def batch_admission(self) -> bool:
        return self.settings[0] == "batch"

    @property
    def chunks_prompts(self) -> bool:
        return self.settings[2]

    def kv_tokens_needed(self, prompt_len: int, max_tokens: int) -> int:
        """KV slots a request needs on its own: on pages and under batch admission (a batch of one;
        batches reserve per batch, `reservation.py`) its prompt + output; reserved iteration-level
        memory: the `reservation` rule."""
        if self.paged or self.batch_admission:
            return prompt_len + max_tokens
        return reservation_tokens(self.reservation, prompt_len, max_tokens, self.max_model_len)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @classmethod
    def from_dict(cls, data: dict) -> "EngineConfig":
        check_known_keys(cls, data, "engine setting")
        return cls(**data)
