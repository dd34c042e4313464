"""The metric registry (experiments/metric_names.py) is exactly what each engine reports: one tiny
run per engine through the harness (`experiments.run.main`); the GEMM roofline, which compiles in
its measured part by design, and the llama.cpp baseline (an optional extra, on a stub) directly;
llama.cpp's quantization rows in tests/experiments/test_llama_cpp_quant.py."""

from __future__ import annotations

import itertools
import json

import pytest
import yaml

from experiments.config import RUN_CONFIG_BY_ENGINE
from experiments.metric_names import METRICS, NOT_NUMBERS, TOKEN_AGREEMENT

# one small run of every engine through the harness (the other two are checked directly below),
# in experiments of one report kind each (experiments.config_checks.REPORT_GROUPS)
ENGINE_RUNS = {
    "static": {"batch_size": 2},
    "hf": {"batch_size": 2},
    "continuous": {"num_blocks": 16},
    "memory_sim": {"reservation": "paged", "kv_budget_tokens": 256, "max_len": 64},
    "sharing_sim": {"mode": "parallel_sampling", "width": 2},
    "attention_bench": {"backend": "contiguous", "batch_size": 2, "context_len": 16, "iterations": 2},
    "fusion_bench": {"kernels": "xla", "phase": "decode", "batch_size": 2, "context_len": 16, "iterations": 2},
    "quant_eval": {"quantization": "int8", "perplexity_windows": 1, "window": 32, "context_len": 16,
                   "prompt_len": 16, "iterations": 1},
    "parallel_eval": {"tp": 1, "batch_size": 2, "context_len": 16, "prompt_len": 16, "iterations": 1},
    "parallel_projection": {"model_shape": "llama-2-7b", "gpu": "A100-80GB"},
}


def assert_reports_registry(engine: str, metrics: dict, harness_added: bool = True) -> None:
    """`metrics` has exactly the registry's names for `engine` (less what the harness adds, for an
    engine run on its own), numbers except NOT_NUMBERS."""
    expected = METRICS[engine] if harness_added else METRICS[engine] - set(TOKEN_AGREEMENT)
    missing, unlisted = expected - set(metrics), set(metrics) - expected
    assert not missing and not unlisted, (f"experiments/metric_names.py is out of date for engine {engine!r}: "
                                          f"listed but not reported {sorted(missing)}, reported but not "
                                          f"listed {sorted(unlisted)}")
    for name, value in metrics.items():
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        assert is_number != (name in NOT_NUMBERS.get(engine, ())), (engine, name, value)


def test_every_engine_is_registered_and_run_here():
    assert set(METRICS) == set(RUN_CONFIG_BY_ENGINE) == set(ENGINE_RUNS) | {"gemm_roofline", "llama-cpp",
                                                                                   "llama-cpp-quant"}
    assert set(NOT_NUMBERS) <= set(METRICS)


@pytest.mark.parametrize("engines", [("static", "hf", "continuous"), ("memory_sim",), ("sharing_sim",),
                                     ("attention_bench",), ("fusion_bench",), ("quant_eval",),
                                     ("parallel_eval",), ("parallel_projection",)], ids=lambda engines: "+".join(engines))
def test_each_engine_reports_exactly_its_registered_metrics(engines, tmp_path):
    from experiments.run import main

    config = {"experiment": "metric_names", "model": "tiny",
              "workload": {"kind": "alpaca", "num_requests": 3, "max_prompt_len": 8, "max_output_len": 4},
              "runs": [{"name": engine, "engine": engine, **ENGINE_RUNS[engine]} for engine in engines]}
    path = tmp_path / "metric_names.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main([str(path), "--out", str(tmp_path / "out")]) == 0
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [run["name"] for run in runs] == list(engines)
    for run in runs:
        assert_reports_registry(run["config"]["engine"], run["metrics"])


def test_gemm_roofline_reports_exactly_its_registered_metrics():
    import models
    from experiments.config import GemmRooflineRunConfig
    from experiments.metrics import summarize
    from experiments.roofline import GemmRooflineEngine

    run = GemmRooflineRunConfig(name="roofline", engine="gemm_roofline", size=32, iterations=2)
    engine = GemmRooflineEngine(models.load("tiny"), run, [])
    engine.warmup()
    assert_reports_registry("gemm_roofline", summarize(engine.serve([], lambda n: None)))


def test_llama_cpp_reports_exactly_its_registered_metrics():
    """The serving loop and metrics of the llama.cpp baseline, on a stub in place of llama.cpp."""
    from experiments.baselines.llama_cpp import LlamaCppEngine
    from experiments.metrics import summarize
    from experiments.workloads import Request

    class StubLlama:
        def reset(self):
            pass

        def generate(self, prompt, **sampling):
            return itertools.count(7)

    engine = LlamaCppEngine.__new__(LlamaCppEngine)  # skips loading llama.cpp and the GGUF weights
    engine.per_token_bytes, engine.outputs, engine.llm = 4, {}, StubLlama()
    requests = [Request(0, (5, 6), 3, 0.0), Request(1, (5,), 2, 0.0)]
    assert_reports_registry("llama-cpp", summarize(engine.serve(requests, lambda n: None)), harness_added=False)


@pytest.mark.parametrize("engine", sorted(METRICS))
def test_claimable_metrics_are_the_numbers(engine):
    from experiments.metric_names import claimable_metrics

    assert set(claimable_metrics(engine)) == METRICS[engine] - NOT_NUMBERS.get(engine, frozenset())
