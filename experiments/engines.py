"""The registry of engines the harness can run (one name -> one class, imported on first use), and the
startup rule they share: build, warm up, then serve with no compile in the timed part.

The warm-up rule is the experiment's (`warmup` in its config) and the same for every engine that
serves requests (ours, HF, llama.cpp): either one untimed pass over the same workload, all requests
at once (`trace.untimed_pass`), or a precompile of every program the workload reaches, which serves
nothing (HF's and llama.cpp's have nothing to compile). Building the engine plus its warm-up is its
startup, reported as `startup_s` beside the programs it compiled; the timed run that follows must
compile nothing (`warm_up_and_serve` fails the run otherwise). The engine interface and the trace
types live in `trace.py`, which every engine imports; this module imports the engines, so there is
no import circle.
"""

from __future__ import annotations

import importlib
import sys
import time

import jax
from tqdm import tqdm

import models
from experiments.compile_watch import CompiledWhileTimed, CompileWatch
from experiments.trace import Engine, RunTrace
from experiments.workloads import Request

# engine name (a run's `engine:` key) -> "module:class"; llama-cpp with `parallel > 1` is llama-cpp-parallel
ENGINES = {
    "static": "experiments.static_engine:StaticEngine",
    "hf": "experiments.baselines.hf_generate:HFGenerateEngine",
    "continuous": "experiments.continuous_engine:ContinuousServeEngine",
    "llama-cpp": "experiments.baselines.llama_cpp:LlamaCppEngine",
    "llama-cpp-parallel": "experiments.baselines.llama_cpp_parallel:LlamaCppParallelEngine",
    "gemm_roofline": "experiments.roofline:GemmRooflineEngine",
    "attention_bench": "experiments.attention_bench:AttentionBenchEngine",
    "fusion_bench": "experiments.fusion_bench:FusionBenchEngine",
    "quant_eval": "experiments.quant_eval:QuantEvalEngine",
    "llama-cpp-quant": "experiments.baselines.llama_cpp_quant:LlamaCppQuantEngine",
    "memory_sim": "experiments.memory_sim:MemorySimEngine",
    "sharing_sim": "experiments.sharing:SharingSimEngine",
    "parallel_eval": "experiments.parallel_eval:ParallelEvalEngine",
    "parallel_projection": "experiments.parallel_projection:ParallelProjectionEngine",
}


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
    """Build the engine a run config names (`ENGINES`)."""
    name = run_config.engine
    if name == "llama-cpp" and getattr(run_config, "parallel", 1) > 1:
        name = "llama-cpp-parallel"
    if name not in ENGINES:
        allowed = ", ".join(repr(n) for n in ENGINES if n != "llama-cpp-parallel")
        raise ValueError(f"unknown engine {run_config.engine!r}; allowed: {allowed}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)(model, run_config, requests)
