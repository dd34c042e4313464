"""The request-rate sweep: warm-up once per run, an untimed rehearsal of each rate's own arrivals
before its timed replay, partial results after each (run, rate)."""

from __future__ import annotations

import json

import pytest

import experiments.run as run_module
from experiments.config import parse_config
from experiments.sweep import MAX_REHEARSALS, rehearse

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


def test_each_timed_replay_follows_a_rehearsal_of_the_same_arrivals(tmp_path, monkeypatch):
    real_make_engine, calls = run_module.make_engine, []

    def make_engine(model, run_config, requests):
        return RecordingEngine(real_make_engine(model, run_config, requests), run_config.name, calls)

    monkeypatch.setattr("experiments.sweep.make_engine", make_engine)
    result = run_module.run_experiment(parse_config(SWEEP), tmp_path)
    for name in ("continuous", "chunked"):
        mine = [(kind, arrivals) for n, kind, arrivals in calls if n == name]
        assert mine[0] == ("warmup", None) and all(kind == "serve" for kind, _ in mine[1:])
        timed = {r["config"]["request_rate"]: r for r in result["runs"] if r["config"]["name"] == name}
        # each rate: >= 1 rehearsal, then the timed replay, all of the same arrivals
        served = [arrivals for _, arrivals in mine[1:]]
        assert len(set(served)) == 2 and served.count(served[0]) >= 2 and served.count(served[-1]) >= 2
        assert served == sorted(served, key=served.index)  # every replay of rate 30, then of rate 300
        assert max(served[-1]) < max(served[0]) and set(timed) == {30, 300}
    assert not (tmp_path / "results.partial.json").exists()


class CompilingEngine:
    """Fake engine whose replays compile `compiles[i]` programs on the i-th serve."""

    def __init__(self, compiles):
        self.compiles, self.serves = list(compiles), 0

    def serve(self, requests, progress):
        from experiments.engines import RunTrace

        self.serves += 1
        return RunTrace([], 1.0, 0, 0, 0.0, 0, num_compilations=self.compiles.pop(0))


@pytest.mark.parametrize("compiles, serves", [([0], 1), ([3, 1, 0], 3), ([3, 2, 1, 1], MAX_REHEARSALS),
                                              ([None], 1)])
def test_rehearsal_repeats_while_a_replay_compiles(compiles, serves):
    engine = CompilingEngine(compiles)
    rehearse(engine, [], "run@1")
    assert engine.serves == serves


def test_finished_rates_survive_a_later_run_that_dies(tmp_path, monkeypatch):
    real_make_engine = run_module.make_engine

    def make_engine(model, run_config, requests):
        if run_config.name == "chunked":
            raise MemoryError("killed")
        return real_make_engine(model, run_config, requests)

    monkeypatch.setattr("experiments.sweep.make_engine", make_engine)
    with pytest.raises(MemoryError):
        run_module.run_experiment(parse_config(SWEEP), tmp_path)
    partial = json.loads((tmp_path / "results.partial.json").read_text())
    assert [r["name"] for r in partial["runs"]] == ["continuous@30", "continuous@300"]
