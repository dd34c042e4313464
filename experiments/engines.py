"""Engines the harness can run, behind one small interface, and the serving loop they share.

An engine is built from `(model, run_config, requests)` and offers `warmup()` (untimed preparation),
`precompile()` (compile what the workload needs, serve nothing) and `serve(requests, progress) ->
RunTrace` (replay the arrivals in real time and record when each request got its first token and
finished).

The warm-up rule is the experiment's (`warmup` in its config) and the same for every engine that
serves requests (ours, HF, llama.cpp): either one untimed pass over the same workload, all requests
at once (`untimed_pass`), or a precompile of every program the workload reaches, which serves
nothing (HF's and llama.cpp's have nothing to compile). Building the engine plus its warm-up is its
startup, reported as `startup_s` beside the programs it compiled; the timed run that follows must
compile nothing (`warm_up_and_serve` fails the run otherwise).
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from tqdm import tqdm

import models
from models.static_batch import batch_shape, run_static_batch
from models.sampling import SamplingConfig
from experiments.compile_watch import CompiledWhileTimed, CompileWatch
from experiments.workloads import Request


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    request_id: int
    prompt_len: int
    output_len: int
    arrival_s: float  # all times: seconds after the run started
    first_token_s: float
    finish_s: float


@dataclasses.dataclass(frozen=True)
class BatchOutcome:
    first_token_time: float  # time.perf_counter() when the batch's first tokens were on the host
    end_time: float
    kv_bytes_allocated: int  # peak reservation during the batch
    kv_bytes_used: int  # bytes holding real tokens at the batch's end
    kv_utilization: float  # share of the reservation holding real tokens, averaged over steps
    generated_tokens: int  # every token computed, including rows that had already finished


@dataclasses.dataclass
class RunTrace:
    records: list[RequestRecord]
    wall_s: float
    kv_bytes_allocated_peak: int
    kv_bytes_used_peak: int
    kv_utilization: float  # per-step share of reserved KV bytes holding real tokens, time-weighted
    generated_tokens: int
    prefill_s: float = 0.0  # time from a batch's start to its first tokens, summed over batches
    num_compilations: int = 0  # jax programs compiled during the timed run (must be 0)
    startup_s: float = 0.0  # building the engine + its untimed warm-up pass
    warmup_s: float = 0.0
    startup_compilations: int = 0  # jax programs compiled (or loaded from the persistent cache) at startup
    startup_compile_s: float = 0.0  # seconds of startup spent tracing, lowering and compiling
    simulated: bool = False  # times are model iterations, not seconds (memory simulations)
    extra_metrics: dict = dataclasses.field(default_factory=dict)


class OptionalEngineMissing(ImportError):
    """An optional baseline's package is not installed: the harness skips that run and says so."""


class Engine(Protocol):
    def warmup(self) -> None: ...
    def precompile(self) -> None: ...  # engines named in config_checks.PRECOMPILE_ENGINES
    def serve(self, requests: list[Request], progress: Callable[[int], None]) -> RunTrace: ...


def serve_static_batches(requests: list[Request], batch_size: int,
                         run_batch: Callable[[list[Request]], BatchOutcome],
                         progress: Callable[[int], None]) -> RunTrace:
    """FasterTransformer-style serving: when idle, take up to `batch_size` requests that have
    arrived (waiting for the next arrival if none has) and run them to completion as one batch.
    Every request of a batch gets its answer when the whole batch ends."""
    pending = collections.deque(sorted(requests, key=lambda r: r.arrival_s))
    records: list[RequestRecord] = []
    alloc_peak = used_peak = generated = 0
    prefill_s = weighted_util = busy_s = 0.0
    start = time.perf_counter()
    while pending:
        wait = pending[0].arrival_s - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        now = time.perf_counter() - start
        batch = []
        while pending and len(batch) < batch_size and pending[0].arrival_s <= now:
            batch.append(pending.popleft())
        batch_start = time.perf_counter()
        outcome = run_batch(batch)
        prefill_s += outcome.first_token_time - batch_start
        weighted_util += outcome.kv_utilization * (outcome.end_time - batch_start)
        busy_s += outcome.end_time - batch_start
        alloc_peak = max(alloc_peak, outcome.kv_bytes_allocated)
        used_peak = max(used_peak, outcome.kv_bytes_used)
        generated += outcome.generated_tokens
        for r in batch:
            records.append(RequestRecord(r.request_id, len(r.prompt), r.output_len, r.arrival_s,
                                         outcome.first_token_time - start, outcome.end_time - start))
        progress(len(batch))
    return RunTrace(records, time.perf_counter() - start, alloc_peak, used_peak, weighted_util / busy_s,
                    generated, prefill_s)


def at_once(requests: list[Request]) -> list[Request]:
    """The same requests, all arriving at t=0."""
    return [dataclasses.replace(r, arrival_s=0.0) for r in requests]


def untimed_pass(engine, requests: list[Request], desc: str) -> None:
    """The warm-up every serving engine gets: serve the workload once, all at once, untimed, and
    forget its outputs. It compiles (or, for torch, warms the allocator for) every shape the
    workload reaches."""
    with tqdm(total=len(requests), desc=f"warm-up {desc}", unit="req", file=sys.stderr, leave=False) as bar:
        engine.serve(at_once(requests), bar.update)
    if getattr(engine, "outputs", None) is not None:
        engine.outputs.clear()


class StaticEngine:
    """Our naive engine: FasterTransformer-style static batches on a contiguous KV cache sized per
    batch (`[batch_size, its longest prompt (bucketed) + its largest output]`, as FT sizes its cache
    per call)."""

    def __init__(self, model: models.Model, run_config, requests: list[Request]):
        self.model, self.batch_size, self.requests = model, run_config.batch_size, requests
        self.greedy = SamplingConfig()
        self.outputs: dict[int, list[int]] = {}  # request id -> generated tokens (for checks)

    def _run(self, prompts, output_lens, row_ids, max_decode_steps=None):
        return run_static_batch(self.model.params, self.model.config, prompts, output_lens,
                                [self.greedy] * len(prompts), row_ids=row_ids, ignore_eos=True,
                                batch_size=self.batch_size, max_decode_steps=max_decode_steps)

    def warmup(self) -> None:
        untimed_pass(self, self.requests, f"static b{self.batch_size}")

    def precompile(self) -> None:
        """Compile the programs of every batch the workload forms when it arrives at once: each
        distinct (padded prompt length, cache length) runs its prefill and one decode step."""
        arrived = sorted(self.requests, key=lambda r: r.arrival_s)
        seen = set()
        for start in range(0, len(arrived), self.batch_size):
            batch = arrived[start:start + self.batch_size]
            shape = batch_shape([len(r.prompt) for r in batch], [r.output_len for r in batch], self.batch_size)
            if shape not in seen:
                seen.add(shape)
                self._run([list(r.prompt) for r in batch], [r.output_len for r in batch],
                          [r.request_id for r in batch], max_decode_steps=1)

    def serve(self, requests, progress):
        def run_batch(batch: list[Request]) -> BatchOutcome:
            result = self._run([list(r.prompt) for r in batch], [r.output_len for r in batch],
                               [r.request_id for r in batch])
            self.outputs.update({r.request_id: list(tokens) for r, tokens in zip(batch, result.tokens)})
            generated = self.batch_size * (result.decode_steps + 1)
            return BatchOutcome(result.first_token_time, result.end_time, result.kv_bytes_allocated,
                                result.kv_bytes_used, result.kv_bytes_used_mean / result.kv_bytes_allocated,
                                generated)

        return serve_static_batches(requests, self.batch_size, run_batch, progress)


def kv_bytes_per_token(model: models.Model) -> int:
    return model.config.kv_bytes_per_token(jnp.dtype(model.params["embed"].dtype).itemsize)


def drop_compiled_programs() -> None:
    """Free every program jax has compiled so far; the harness calls it before each run's warm-up.
    XLA CPU maps each compiled program's code into its own memory mappings, and a run of several
    policies compiles hundreds of 30-layer step shapes: the process then passes the kernel's
    65,530-mapping limit (vm.max_map_count) and LLVM fails with "Cannot allocate memory" (measured:
    ~18,000 mappings for the chunked-prefill warm-up of throughput_vs_rate.yaml alone). Each run's
    warm-up compiles its own shapes again, untimed."""
    jax.clear_caches()


def warm_up_and_serve(engine: Engine, requests: list[Request], name: str, warmup: str, *,
                      build_s: float = 0.0, build_watch: CompileWatch | None = None,
                      allow_timed_compiles: bool | None = None) -> RunTrace:
    """Warm `engine` up (untimed) as `warmup` says (`untimed_pass`: `engine.warmup()`; `precompile`:
    `engine.precompile()`; `none`), then serve `requests` behind a progress bar. The trace records
    the startup (`build_s`, the seconds it took to build the engine, plus the warm-up) and the
    programs compiled in each part; a timed run that compiles raises `CompiledWhileTimed` unless
    `allow_timed_compiles` (default: when `warmup` is `none`; its compile seconds then stay in its
    clock, and are reported) or the engine is a micro-benchmark that warms up and times each
    measurement itself (`times_itself`) or counts memory, not seconds (`simulated`)."""
    if allow_timed_compiles is None:
        allow_timed_compiles = warmup == "none"
    start = time.perf_counter()
    with CompileWatch() as startup:
        if warmup == "untimed_pass":
            engine.warmup()
        elif warmup == "precompile":
            engine.precompile()
        elif warmup != "none":
            raise ValueError(f"warmup must be 'untimed_pass', 'precompile' or 'none', got {warmup!r}")
    warmup_s = time.perf_counter() - start if warmup != "none" else 0.0
    with CompileWatch() as timed, tqdm(total=len(requests), desc=name, unit="req", file=sys.stderr) as bar:
        trace = engine.serve(requests, bar.update)
    untimed = getattr(engine, "simulated", False) or getattr(engine, "times_itself", False)
    if timed.programs and not allow_timed_compiles and not untimed:
        raise CompiledWhileTimed(
            f"run {name!r} compiled {timed.programs} program(s) ({timed.seconds:.1f} s) inside its timed "
            "part: its startup did not prepare every step shape the run met")
    built = build_watch or CompileWatch()
    trace.warmup_s, trace.startup_s = warmup_s, build_s + warmup_s
    trace.startup_compilations = built.programs + startup.programs
    trace.startup_compile_s = built.seconds + startup.seconds
    trace.num_compilations = timed.programs
    return trace


def build_engine(model: models.Model, run_config, requests: list[Request]) -> tuple[Engine, float, CompileWatch]:
    """`make_engine`, timed and watched for compiles (both part of the run's startup)."""
    start = time.perf_counter()
    with CompileWatch() as watch:
        engine = make_engine(model, run_config, requests)
    return engine, time.perf_counter() - start, watch


def make_engine(model: models.Model, run_config, requests: list[Request]) -> Engine:
    """Build the engine a run config names."""
    if run_config.engine == "static":
        return StaticEngine(model, run_config, requests)
    if run_config.engine == "hf":
        from experiments.baselines.hf_generate import HFGenerateEngine

        return HFGenerateEngine(model, run_config, requests)
    if run_config.engine == "paged":
        from experiments.paged_engine import PagedStaticEngine

        return PagedStaticEngine(model, run_config, requests)
    if run_config.engine == "continuous":
        from experiments.continuous_engine import ContinuousServeEngine

        return ContinuousServeEngine(model, run_config, requests)
    if run_config.engine == "llama-cpp" and run_config.parallel > 1:
        from experiments.baselines.llama_cpp_parallel import LlamaCppParallelEngine

        return LlamaCppParallelEngine(model, run_config, requests)
    if run_config.engine == "llama-cpp":
        from experiments.baselines.llama_cpp import LlamaCppEngine

        return LlamaCppEngine(model, run_config, requests)
    if run_config.engine == "gemm_roofline":
        from experiments.roofline import GemmRooflineEngine

        return GemmRooflineEngine(model, run_config, requests)
    if run_config.engine == "attention_bench":
        from experiments.attention_bench import AttentionBenchEngine

        return AttentionBenchEngine(model, run_config, requests)
    if run_config.engine == "memory_sim":
        from experiments.memory_sim import MemorySimEngine

        return MemorySimEngine(model, run_config, requests)
    if run_config.engine == "sharing_sim":
        from experiments.sharing import SharingSimEngine

        return SharingSimEngine(model, run_config, requests)
    raise ValueError(f"unknown engine {run_config.engine!r}; "
                     "allowed: 'static', 'hf', 'paged', 'continuous', 'llama-cpp', 'gemm_roofline', "
                     "'memory_sim', 'sharing_sim', 'attention_bench'")
