"""llama.cpp's rows of the quantization table (experiments/baselines/llama_cpp_quant.py): the F32
file scores our model's perplexity, a block-format file has the format's size and llama.cpp's
accuracy on it is our block-rounded model's, and the engine reports the quantization metrics."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest

import models
from experiments.baselines.llama_cpp_quant import LlamaCppQuantEngine
from experiments.config import LlamaCppQuantRunConfig, parse_config
from experiments.engines import make_engine
from experiments.metrics import summarize
from experiments.perplexity import perplexity
from experiments.quant_eval import text_token_ids, tree_bytes
from experiments.trace import OptionalEngineMissing
from quantization.ggml_params import round_through_blocks

SMALL = {"perplexity_windows": 1, "window": 64, "context_len": 16, "prompt_len": 32, "iterations": 1}
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama.cpp is the baseline: pip install -e '.[llama-cpp]'")
LINEAR_WEIGHTS = 30 * (576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536)  # q, k, v, o, gate, up, down


def measure(model: models.Model, quantization: str, **settings) -> dict:
    run = LlamaCppQuantRunConfig(name=quantization, engine="llama-cpp-quant", quantization=quantization,
                                 **{**SMALL, **settings})
    return summarize(LlamaCppQuantEngine(model, run, []).serve([], lambda n: None))


@needs_llama_cpp
def test_f32_file_scores_our_models_perplexity(smollm2):
    metrics = measure(smollm2, "none")
    ours, scored = perplexity(smollm2, text_token_ids(smollm2), window=64, max_windows=1)
    assert metrics["perplexity_tokens"] == scored == 63
    # the same F32 weights; llama.cpp keeps its KV cache in F16
    assert metrics["perplexity"] == pytest.approx(ours, rel=1e-3)
    assert metrics["logit_mean_abs_err"] < 0.01 and metrics["top1_agreement"] > 0.98
    assert metrics["bits_per_weight"] == 32.0 and metrics["model_bytes"] == tree_bytes(smollm2.params)
    assert metrics["block_formats_used"] == "F32 x210"
    for key in ("decode_b1_tokens_per_s", "decode_b64_tokens_per_s", "prompt_tokens_per_s"):
        assert metrics[key] > 0


@needs_llama_cpp
def test_q8_0_file_has_the_formats_size_and_our_rounded_models_accuracy(smollm2):
    from tests.experiments.test_metric_names import assert_reports_registry

    metrics = measure(smollm2, "Q8_0", window=512)
    assert_reports_registry("llama-cpp-quant", metrics)
    assert metrics["bits_per_weight"] == 8.5  # 34 bytes per 32 weights; every row is whole blocks
    assert metrics["model_bytes"] == tree_bytes(smollm2.params) - 4 * LINEAR_WEIGHTS + LINEAR_WEIGHTS * 34 // 32
    rounded = dataclasses.replace(smollm2, params=round_through_blocks(smollm2.params, "Q8_0")[0])
    ours, _ = perplexity(rounded, text_token_ids(smollm2), window=512, max_windows=1)
    # the same Q8_0 weights, but llama.cpp also rounds each activation row to Q8_0 blocks before the
    # dot (measured: +0.35% on this 512-token window, +2.5% on a 64-token one)
    assert metrics["perplexity"] == pytest.approx(ours, rel=1e-2)


def test_missing_llama_cpp_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    config = parse_config({"experiment": "x", "model": "tiny", "workload": {"kind": "alpaca", "num_requests": 1},
                           "runs": [{"name": "q", "engine": "llama-cpp-quant", "quantization": "Q4_0"}]})
    with pytest.raises(OptionalEngineMissing, match=r"pip install -e \.\[llama-cpp\]"):
        make_engine(models.load("tiny"), config.runs[0], [])


def test_only_llama_cpp_formats_are_accepted():
    with pytest.raises(ValueError, match="quantization") as err:
        parse_config({"experiment": "x", "model": "tiny", "workload": {"kind": "alpaca", "num_requests": 1},
                      "runs": [{"name": "q", "engine": "llama-cpp-quant", "quantization": "int8"}]})
    assert "Q4_0" in str(err.value) and "none" in str(err.value)


@needs_llama_cpp
def test_llama_cpp_quant_needs_gguf_weights():
    config = parse_config({"experiment": "x", "model": "tiny", "workload": {"kind": "alpaca", "num_requests": 1},
                           "runs": [{"name": "q", "engine": "llama-cpp-quant", "quantization": "none"}]})
    with pytest.raises(ValueError, match="GGUF"):
        make_engine(models.load("tiny"), config.runs[0], [])
