"""The request-rate sweep (warm-up once per run, one timed replay per rate, partial results after
each), the compile watch, and the rule that a timed run compiles nothing."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import pytest

import experiments.run as run_module
import models
from experiments.compile_watch import CompiledWhileTimed, CompileWatch
from experiments.config import parse_config
from experiments.engines import drop_compiled_programs, make_engine, warm_up_and_serve
from experiments.workloads import Request

SWEEP = {"experiment": "sweep", "model": "tiny", "request_rates": [30, 300],
         "workload": {"kind": "alpaca", "num_requests": 8, "max_prompt_len": 40, "max_output_len": 5},
         "runs": [{"name": "continuous", "engine": "continuous", "policy": "continuous", "num_blocks": 32},
                  {"name": "chunked", "engine": "continuous", "policy": "chunked_prefill",
                   "max_num_batched_tokens": 32, "num_blocks": 32}]}


class RecordingEngine:
    """Wraps a real engine and records what the sweep asks of it."""

    def __init__(self, engine, name, calls):
        self.engine, self.name, self.calls = engine, name, calls

    def warmup(self):
        self.calls.append((self.name, "warmup", None))
        self.engine.warmup()

    def serve(self, requests, progress):
        self.calls.append((self.name, "serve", tuple(r.arrival_s for r in requests)))
        return self.engine.serve(requests, progress)


def test_one_warm_up_per_run_then_one_replay_per_rate(tmp_path, monkeypatch):
    calls = []

    def recording_engine(model, run_config, requests):
        return RecordingEngine(make_engine(model, run_config, requests), run_config.name, calls)

    monkeypatch.setattr("experiments.engines.make_engine", recording_engine)
    result = run_module.run_experiment(parse_config(SWEEP), tmp_path)
    assert [(name, kind) for name, kind, _ in calls] == [
        (name, kind) for name in ("continuous", "chunked") for kind in ("warmup", "serve", "serve")]
    served = [arrivals for _, kind, arrivals in calls if kind == "serve"]
    assert served[0] == served[2] and served[1] == served[3]  # both runs replay the same arrivals
    assert max(served[1]) < max(served[0])  # 300 req/s arrive sooner than 30 req/s
    assert [r["name"] for r in result["runs"]] == ["continuous@30", "continuous@300", "chunked@30", "chunked@300"]
    for run in result["runs"]:
        m = run["metrics"]
        assert m["num_compilations"] == 0  # Poisson steps ran on compiled shapes (padded where needed)
        first_rate = run["name"].endswith("@30")
        assert (m["startup_compilations"] > 0) == (m["startup_s"] > 0) == first_rate  # later rates reuse it
    assert not (tmp_path / "results.partial.json").exists()


def test_finished_rates_survive_a_later_run_that_dies(tmp_path, monkeypatch):
    def dying_engine(model, run_config, requests):
        if run_config.name == "chunked":
            raise MemoryError("killed")
        return make_engine(model, run_config, requests)

    monkeypatch.setattr("experiments.engines.make_engine", dying_engine)
    with pytest.raises(MemoryError):
        run_module.run_experiment(parse_config(SWEEP), tmp_path)
    partial = json.loads((tmp_path / "results.partial.json").read_text())
    assert [r["name"] for r in partial["runs"]] == ["continuous@30", "continuous@300"]


def _fresh_program(n: int):
    """A jitted function jax has never compiled (a new closure each call), with `n` chained ops."""
    def f(x):
        for i in range(n):
            x = jnp.sin(x) * (i + 1.0)
        return x
    return jax.jit(f)


def test_compile_watch_counts_new_programs_and_their_seconds_only():
    x = jnp.ones(8)
    with CompileWatch() as watch:
        fn = _fresh_program(300)
        fn(x).block_until_ready()  # traces, lowers and compiles
        programs, seconds = watch.programs, watch.seconds
        fn(x).block_until_ready()  # cached: no compile
    assert programs >= 1 and seconds > 0.05
    assert (watch.programs, watch.seconds) == (programs, seconds)
    with CompileWatch() as other:  # the first watch no longer listens
        _fresh_program(50)(x).block_until_ready()
    assert watch.programs == programs and other.programs >= 1


def test_a_timed_run_that_compiles_fails_and_a_warmed_up_one_compiles_nothing():
    model = models.load("tiny", dtype="float32")
    requests = [Request(0, (5, 6, 7), 4, 0.0), Request(1, (8, 9), 3, 0.0)]  # offline: the warm-up meets every shape
    run_config = parse_config(SWEEP).runs[0]
    drop_compiled_programs()  # whatever ran before in this process, this run compiles its shapes
    with pytest.raises(CompiledWhileTimed, match="compiled .* program"):
        warm_up_and_serve(make_engine(model, run_config, requests), requests, "cold", warmup="none",
                          allow_timed_compiles=False)
    drop_compiled_programs()
    trace = warm_up_and_serve(make_engine(model, run_config, requests), requests, "warm", warmup="untimed_pass")
    assert trace.num_compilations == 0 and trace.startup_compilations > 0
    assert trace.startup_s >= trace.warmup_s > 0 and trace.startup_compile_s > 0
    cold = warm_up_and_serve(make_engine(model, run_config, requests), requests, "allowed", warmup="none")
    assert cold.num_compilations == 0  # the same shapes: compiled by the warm-up above
