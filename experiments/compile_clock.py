"""A run clock that stops while jax compiles, so a timed replay measures serving, not compilation.

A server that precompiled every step shape (vLLM on TPU compiles its whole bucket grid at start-up)
never stalls on a compile; our engine compiles a shape the first time a step needs it, and one
30-layer step of the real model takes seconds to compile. The harness warms each run up first, but
Poisson arrivals mix prompts and decodes into shapes an all-at-once warm-up never meets: in the first
real-model rate sweep the timed runs compiled 1-8 programs each, and untimed rehearsals of the same
arrivals (up to 3) still left up to 5 per run. Inside `with CompileClock() as clock:` `clock.now()`
is the wall time since entry minus the seconds jax spent tracing, lowering and compiling since entry
(jax.monitoring's compile events), so the run goes on as if those programs had been ready; runs
report how many compiles and seconds were left out (`num_compilations`, `compile_s_excluded`).
"""

from __future__ import annotations

import time

import jax.monitoring

COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
})


class CompileClock:
    """Seconds since `__enter__`, less the time jax spent compiling meanwhile (`compile_s`)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.compile_s = 0.0

    def _on_duration(self, event: str, duration_secs: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            self.compile_s += duration_secs

    def __enter__(self) -> "CompileClock":
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        self.start, self.compile_s = time.perf_counter(), 0.0
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)

    def now(self) -> float:
        return time.perf_counter() - self.start - self.compile_s

    def sleep_until(self, t: float) -> None:
        """Sleep until `now()` reaches `t` (no compile happens while sleeping)."""
        wait = t - self.now()
        if wait > 0:
            time.sleep(wait)
