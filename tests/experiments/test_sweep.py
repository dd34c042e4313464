"""The request-rate sweep (warm-up once per run, one timed replay per rate, partial results after
each) and the clock that stops while jax compiles."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import pytest

import experiments.run as run_module
import models
from experiments.compile_clock import CompileClock
from experiments.config import parse_config
from experiments.engines import drop_compiled_programs, make_engine
from experiments.workloads import Request

SWEEP = {"experiment": "sweep", "model": "tiny", "request_rates": [30, 300],
         "workload": {"kind": "alpaca", "num_requests": 8, "max_prompt_len": 40, "max_output_len": 5},
         "runs": [{"name": "continuous", "engine": "continuous", "policy": "continuous", "kv_cache_tokens": 512},
                  {"name": "chunked", "engine": "continuous", "policy": "chunked_prefill",
                   "max_num_batched_tokens": 32, "kv_cache_tokens": 512}]}


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

    monkeypatch.setattr("experiments.sweep.make_engine", recording_engine)
    result = run_module.run_experiment(parse_config(SWEEP), tmp_path)
    assert [(name, kind) for name, kind, _ in calls] == [
        (name, kind) for name in ("continuous", "chunked") for kind in ("warmup", "serve", "serve")]
    served = [arrivals for _, kind, arrivals in calls if kind == "serve"]
    assert served[0] == served[2] and served[1] == served[3]  # both runs replay the same arrivals
    assert max(served[1]) < max(served[0])  # 300 req/s arrive sooner than 30 req/s
    assert [r["name"] for r in result["runs"]] == ["continuous@30", "continuous@300", "chunked@30", "chunked@300"]
    for run in result["runs"]:
        m = run["metrics"]
        assert m["compile_s_excluded"] >= 0  # small host-side jits may compile too, hence no equivalence
        assert m["compile_s_excluded"] > 0 or m["num_compilations"] == 0
    assert not (tmp_path / "results.partial.json").exists()


def test_finished_rates_survive_a_later_run_that_dies(tmp_path, monkeypatch):
    def dying_engine(model, run_config, requests):
        if run_config.name == "chunked":
            raise MemoryError("killed")
        return make_engine(model, run_config, requests)

    monkeypatch.setattr("experiments.sweep.make_engine", dying_engine)
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


def test_compile_clock_leaves_out_compile_time_only():
    x = jnp.ones(8)
    with CompileClock() as clock:
        start = time.perf_counter()
        fn = _fresh_program(300)
        fn(x).block_until_ready()  # traces, lowers and compiles
        compiled_s = clock.compile_s
        time.sleep(0.2)
        fn(x).block_until_ready()  # cached: no compile
        elapsed = time.perf_counter() - start
        now = clock.now()
    assert compiled_s > 0.05 and clock.compile_s == compiled_s
    assert now == pytest.approx(elapsed - compiled_s, abs=0.05) and now >= 0.2
    with CompileClock() as other:  # the first clock no longer listens
        _fresh_program(50)(x).block_until_ready()
    assert clock.compile_s == compiled_s and other.compile_s > 0


def test_a_cold_continuous_run_leaves_its_compiles_out_of_its_clock():
    model = models.load("tiny", dtype="float32")
    requests = [Request(0, (5, 6, 7), 4, 0.0), Request(1, (8, 9), 3, 0.05)]
    engine = make_engine(model, parse_config(SWEEP).runs[0], requests)
    drop_compiled_programs()  # whatever ran before in this process, this run compiles its shapes
    start = time.perf_counter()
    trace = engine.serve(requests, lambda n: None)
    elapsed = time.perf_counter() - start
    assert trace.num_compilations > 0 and trace.compile_s_excluded > 0
    # the clock runs inside serve (after the engine is built) and drops the compile seconds
    assert 0.05 <= trace.wall_s <= elapsed - trace.compile_s_excluded  # 0.05: the second arrival
