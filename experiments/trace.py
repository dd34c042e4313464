"""What every engine the harness runs shares: the trace a run records, the engine interface, and the
serving helpers more than one engine uses (FasterTransformer-style static batches, the untimed
warm-up pass). Engines import this module; the registry (`engines.py`) imports the engines.

An engine is built from `(model, run_config, requests)` and offers `warmup()` (untimed preparation),
`precompile()` (compile what the workload needs, serve nothing) and `serve(requests, progress) ->
RunTrace` (replay the arrivals in real time and record when each request got its first token and
finished).
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
from typing import Callable, Protocol

import jax.numpy as jnp
from tqdm import tqdm

import models
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


def kv_bytes_per_token(model: models.Model) -> int:
    return model.config.kv_bytes_per_token(jnp.dtype(model.params["embed"].dtype).itemsize)
