"""Count the programs jax compiles, so the harness can keep compiles out of a timed run honestly.

Every engine of the harness prepares before it is timed (startup: building it, then one untimed pass
over the workload, which compiles every step shape that workload reaches). The timed run must then
compile nothing: a compile inside it would be counted in the run's seconds but would not be serving,
and a server that precompiled its shapes would never pay it. `CompileWatch` listens to jax's
monitoring events; each new program lowered to MLIR is one compilation, whether XLA compiles it or
the persistent compilation cache (`experiments.compile_cache`) hands back a stored one.
"""

from __future__ import annotations

import jax.monitoring

LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # once per new program (shape, flags)
COMPILE_STAGES = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    LOWERED,
    "/jax/core/compile/backend_compile_duration",  # XLA compile, or loading from the persistent cache
})
CACHE_HIT = "/jax/compilation_cache/cache_hits"


class CompiledWhileTimed(RuntimeError):
    """A timed run compiled a program: its startup did not prepare every shape the run met."""


class CompileWatch:
    """Inside `with CompileWatch() as watch:`, `watch.programs` counts the programs jax prepared,
    `watch.seconds` the time it spent tracing, lowering and compiling them, and `watch.cache_hits`
    those the persistent cache served."""

    def __init__(self) -> None:
        self.programs, self.seconds, self.cache_hits = 0, 0.0, 0

    def _on_duration(self, event: str, duration_secs: float, **kwargs) -> None:
        if event in COMPILE_STAGES:
            self.seconds += duration_secs
        if event == LOWERED:
            self.programs += 1

    def _on_event(self, event: str, **kwargs) -> None:
        if event == CACHE_HIT:
            self.cache_hits += 1

    def __enter__(self) -> "CompileWatch":
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)
