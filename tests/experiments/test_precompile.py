"""`warmup: precompile`: every engine compiles what the workload reaches without serving it, and its
timed run then compiles nothing and gives the tokens an untimed-pass warm-up gives."""

from __future__ import annotations

import pytest

import models
from continuous_batching.model_runner import PagedModelRunner
from experiments.config import ConfigError, parse_config
from experiments.config_checks import PRECOMPILE_ENGINES
from experiments.engines import drop_compiled_programs, make_engine, warm_up_and_serve
from experiments.workloads import Request

REQUESTS = [Request(i, tuple(range(3 + i, 3 + i + n)), out, 0.0)
            for i, (n, out) in enumerate([(3, 4), (20, 9), (2, 1), (33, 5), (7, 6)])]
RUNS = {
    "static": {"engine": "static", "batch_size": 2},
    "continuous": {"engine": "continuous", "policy": "continuous", "num_blocks": 64, "block_size": 4},
    "chunked": {"engine": "continuous", "policy": "chunked_prefill", "num_blocks": 64, "block_size": 4,
                "max_num_batched_tokens": 16},
    # a combination no policy names: static batches on pages with prefix caching
    "batch_on_pages": {"engine": "continuous", "admission": "batch", "kv_memory": "paged", "max_num_seqs": 2,
                       "enable_prefix_caching": True, "num_blocks": 64, "block_size": 4},
}


def _run_config(name: str, warmup: str):
    data = {"experiment": "p", "model": "tiny", "warmup": warmup, "workload": {"kind": "alpaca", "num_requests": 2},
            "runs": [{"name": name, **RUNS[name]}]}
    return parse_config(data).runs[0]


@pytest.mark.parametrize("name", list(RUNS))
def test_precompiled_run_compiles_nothing_and_matches_the_untimed_pass(tiny_model, name):
    outputs = {}
    for warmup in ("untimed_pass", "precompile"):
        drop_compiled_programs()  # each warm-up compiles its own programs
        engine = make_engine(tiny_model, _run_config(name, warmup), REQUESTS)
        trace = warm_up_and_serve(engine, REQUESTS, name, warmup)  # raises if the timed part compiled
        assert trace.num_compilations == 0 and trace.startup_compilations > 0
        outputs[warmup] = dict(engine.outputs)
    assert outputs["precompile"] == outputs["untimed_pass"]
    assert [len(outputs["precompile"][r.request_id]) for r in REQUESTS] == [r.output_len for r in REQUESTS]


def test_engine_settings_from_the_run_config_give_the_reference_tokens(tiny_model):
    """`admission` / `kv_memory` given one by one reach the engine: static batches of 2 on pages."""
    drop_compiled_programs()
    engine = make_engine(tiny_model, _run_config("batch_on_pages", "untimed_pass"), REQUESTS)
    assert (engine.config.settings, engine.config.max_num_seqs) == (("batch", "paged", False), 2)
    warm_up_and_serve(engine, REQUESTS, "batch_on_pages", "untimed_pass")
    expected = models.generate(tiny_model, [list(r.prompt) for r in REQUESTS],
                               max_new_tokens=max(r.output_len for r in REQUESTS), ignore_eos=True)
    assert [engine.outputs[r.request_id] for r in REQUESTS] == [e[:r.output_len] for e, r in zip(expected, REQUESTS)]


def test_continuous_precompile_runs_one_step_per_new_shape(tiny_model, monkeypatch):
    """The dry run serves nothing: the model runs once per step shape it compiles, not per step."""
    runs = []
    original = PagedModelRunner.run

    def counting_run(self, prepared):
        runs.append(prepared.shape)
        return original(self, prepared)

    monkeypatch.setattr(PagedModelRunner, "run", counting_run)
    drop_compiled_programs()
    engine = make_engine(tiny_model, _run_config("continuous", "precompile"), REQUESTS)
    engine.precompile()
    assert len(runs) == len(set(runs)) == len(engine.shapes.compiled) and engine.shapes.frozen
    steps = len(runs)
    runs.clear()
    engine.serve(REQUESTS, lambda n: None)
    assert len(runs) > steps  # the real run takes more steps than there are shapes


def test_static_precompile_runs_each_batch_shape_once(tiny_model, monkeypatch):
    calls = []
    engine = make_engine(tiny_model, _run_config("static", "precompile"), REQUESTS)
    original = engine._run
    monkeypatch.setattr(engine, "_run", lambda *a, **k: calls.append((a, k)) or original(*a, **k))
    engine.precompile()
    # batches (sorted by arrival, 2 a batch): prompts 3 & 20 tokens -> 32, 2 & 33 -> 64, 7 -> 16
    assert len(calls) == 3 and all(k == {"max_decode_steps": 1} for _, k in calls)


def test_every_precompile_engine_has_precompile():
    from experiments.baselines.hf_generate import HFGenerateEngine
    from experiments.baselines.llama_cpp import LlamaCppEngine
    from experiments.continuous_engine import ContinuousServeEngine
    from experiments.roofline import GemmRooflineEngine
    from experiments.static_engine import StaticEngine

    classes = {"static": StaticEngine, "hf": HFGenerateEngine,
               "continuous": ContinuousServeEngine, "llama-cpp": LlamaCppEngine, "gemm_roofline": GemmRooflineEngine}
    assert sorted(classes) == sorted(PRECOMPILE_ENGINES)
    assert all(callable(getattr(cls, "precompile", None)) for cls in classes.values())


def test_precompile_with_an_engine_that_cannot_is_a_config_error():
    data = {"experiment": "m", "model": "tiny", "warmup": "precompile", "workload": {"kind": "alpaca", "num_requests": 2},
            "runs": [{"name": "m", "engine": "memory_sim", "reservation": "paged", "kv_budget_tokens": 4096}]}
    with pytest.raises(ConfigError, match=r"runs\[0\]\.engine.*cannot precompile.*allowed engines: static"):
        parse_config(data)
    with pytest.raises(ConfigError, match=r"warmup.*untimed_pass.*precompile.*none"):
        parse_config({**data, "warmup": True})


def test_static_max_decode_steps_stops_early(tiny_model):
    from models.static_batch import run_static_batch
    from models.sampling import SamplingConfig

    result = run_static_batch(tiny_model.params, tiny_model.config, [[5, 6, 7]], [9], [SamplingConfig()],
                              ignore_eos=True, max_decode_steps=1)
    assert result.decode_steps == 1 and len(result.tokens[0]) == 2
    assert models.generate(tiny_model, [[5, 6, 7]], 9, ignore_eos=True)[0][:2] == result.tokens[0]


def test_continuous_precompile_adds_the_envelope_only_for_arrivals_over_time(tiny_model):
    """Offline, the dry run meets exactly the timed run's shapes; with arrivals spread in time the
    timed run mixes steps differently, so the envelope is compiled too and steps pad up to it."""
    import dataclasses

    compiled = {}
    for label, requests in [("offline", REQUESTS),
                            ("spread", [dataclasses.replace(r, arrival_s=0.02 * r.request_id) for r in REQUESTS])]:
        drop_compiled_programs()
        engine = make_engine(tiny_model, _run_config("continuous", "precompile"), requests)
        engine.precompile()
        compiled[label] = engine.shapes.compiled
        assert engine.shapes.frozen
        if label == "spread":
            assert all(envelope in engine.shapes.compiled for envelope in engine.shapes.envelope())
        trace = warm_up_and_serve(engine, requests, label, "none", allow_timed_compiles=False)
        assert trace.num_compilations == 0
    assert len(compiled["spread"]) > len(compiled["offline"])
