"""The decode-speed baselines: llama.cpp's F32 GGUF conversion, the optional-engine skip and the
GEMM roofline's FLOP count (both decode configs run end to end in tests/experiments/test_run.py)."""

from __future__ import annotations

import sys

import gguf
import jax
import numpy as np
import pytest

import models
from experiments.baselines.llama_cpp import f32_gguf
from experiments.config import parse_config
from experiments.engines import make_engine
from experiments.trace import OptionalEngineMissing
from experiments.roofline import matmul_flops_per_token
from experiments.run import run_experiment
from models.config import PRESETS
from tests.models.test_loading import assert_params_equal, write_gguf


def test_f32_gguf_holds_the_dequantized_weights_and_the_same_metadata(tiny_model, tmp_path):
    source, dest = tmp_path / "tiny.F16.gguf", tmp_path / "tiny.F32.gguf"
    # matrices in F16 (the tiny shapes fit no 32-wide quantization block), with a toy vocab
    write_gguf(source, tiny_model.params, tiny_model.config, matrix_dtype=np.float16,
               file_type=gguf.LlamaFileType.MOSTLY_F16, toy_vocab=True)
    f32_gguf(source, dest)
    before, after = gguf.GGUFReader(source), gguf.GGUFReader(dest)
    assert {t.tensor_type for t in after.tensors} == {gguf.GGMLQuantizationType.F32}
    for a, b in zip(before.tensors, after.tensors, strict=True):
        assert (a.name, list(a.shape)) == (b.name, list(b.shape))
        np.testing.assert_array_equal(gguf.quants.dequantize(a.data, a.tensor_type).reshape(-1),
                                      np.asarray(b.data).reshape(-1))
    skip = ("GGUF.", "general.file_type")
    fields = lambda r: {k: f.contents() for k, f in r.fields.items() if not k.startswith(skip)}
    assert fields(after) == fields(before)
    assert after.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    assert gguf.GGMLQuantizationType.F16 in {t.tensor_type for t in before.tensors}
    # our loader reads the same params from both files (the F16 rounding is in both)
    assert_params_equal(models.load(source, tokenizer=False).params, models.load(dest, tokenizer=False).params)


def test_missing_llama_cpp_skips_its_run_and_its_claim(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    config = parse_config({
        "experiment": "skip", "model": "tiny", "workload": {"kind": "fixed", "num_requests": 2,
                                                            "max_prompt_len": 4, "max_output_len": 3},
        "runs": [{"name": "llama-cpp", "engine": "llama-cpp"},
                 {"name": "ours", "engine": "continuous", "num_blocks": 8}],
        "claims": [{"claim": "c", "source": "s", "paper": 0.8, "unit": "x", "run": "ours",
                    "metric": "decode_tokens_per_s", "ratio_to": "llama-cpp"}]})
    with pytest.raises(OptionalEngineMissing, match="pip install"):
        make_engine(models.load("tiny"), config.runs[0], [])
    result = run_experiment(config, tmp_path)
    assert [run["name"] for run in result["runs"]] == ["ours"] and result["claims"] == []
    assert "skipping run 'llama-cpp'" in capsys.readouterr().err


def test_llama_cpp_needs_gguf_weights(monkeypatch):
    pytest.importorskip("llama_cpp")  # optional extra; only checked where it is installed
    config = parse_config({"experiment": "x", "model": "tiny", "workload": {"kind": "alpaca", "num_requests": 1},
                           "runs": [{"name": "l", "engine": "llama-cpp"}]})
    with pytest.raises(ValueError, match="GGUF"):
        make_engine(models.load("tiny"), config.runs[0], [])


def test_matmul_flops_per_token_counts_every_matmul_weight_twice():
    config = PRESETS["smollm2-135m"]
    norms = (2 * config.num_layers + 1) * config.hidden_size
    assert matmul_flops_per_token(config) == 2 * (config.num_params() - norms) == 268_959_744


def _llama_cpp_loadable_tiny(tmp_path) -> models.Model:
    """The tiny shape with head_dim = hidden / heads (llama.cpp rotates whole heads), seeded weights
    large enough that greedy picks are far from ties, as a GGUF file, loaded back."""
    from models.llama import init_params

    config = PRESETS["tiny"].replace(head_dim=PRESETS["tiny"].hidden_size // PRESETS["tiny"].num_heads)
    params = jax.tree_util.tree_map(lambda x: x * 4 if x.ndim == 2 else x, init_params(config, seed=0))
    return models.load(write_gguf(tmp_path / "tiny.gguf", params, config, toy_vocab=True), tokenizer=False)


def test_llama_cpp_parallel_slots_give_the_batch1_tokens(tiny_model, tmp_path):
    """llama-server -np N style decoding: several slots share each llama_decode, prompts longer than
    a batch are read in chunks, a finished slot frees its cells for the next request, and every
    request gets the tokens llama.cpp gives it alone (and the tokens our engine gives it)."""
    pytest.importorskip("llama_cpp")  # optional extra; only checked where it is installed
    from experiments.baselines import llama_cpp_parallel
    from experiments.engines import warm_up_and_serve
    from experiments.workloads import Request

    model = _llama_cpp_loadable_tiny(tmp_path)
    requests = [Request(i, tuple(int(t) for t in np.random.default_rng(i).integers(3, 200, n)), out, 0.0)
                for i, (n, out) in enumerate([(5, 7), (40, 3), (9, 12), (3, 1), (22, 6)])]
    runs = {"b1": {}, "np2": {"parallel": 2}, "np4": {"parallel": 4}}
    outputs = {}
    for name, extra in runs.items():
        config = parse_config({"experiment": "x", "model": "tiny", "workload": {"kind": "alpaca", "num_requests": 1},
                               "runs": [{"name": name, "engine": "llama-cpp", **extra}]})
        engine = make_engine(model, config.runs[0], requests)
        assert isinstance(engine, llama_cpp_parallel.LlamaCppParallelEngine) == bool(extra)
        trace = warm_up_and_serve(engine, requests, name, "untimed_pass")
        assert sorted(r.request_id for r in trace.records) == list(range(5))
        outputs[name] = dict(engine.outputs)
        if extra:
            assert trace.extra_metrics["mean_seqs_per_step"] > 1
    assert outputs["np2"] == outputs["b1"] and outputs["np4"] == outputs["b1"]
    assert [len(outputs["b1"][r.request_id]) for r in requests] == [r.output_len for r in requests]
    ours = {r.request_id: models.generate(model, [list(r.prompt)], r.output_len, ignore_eos=True)[0] for r in requests}
    assert ours == outputs["b1"]


def test_llama_cpp_parallel_chunks_long_prompts(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from experiments.baselines import llama_cpp_parallel
    from experiments.workloads import Request

    monkeypatch.setattr(llama_cpp_parallel, "N_BATCH", 16)  # prompts of 40 tokens take 3 batches
    model = _llama_cpp_loadable_tiny(tmp_path)
    requests = [Request(i, tuple(range(3 + i, 43 + i)), 4, 0.0) for i in range(3)]
    config = parse_config({"experiment": "x", "model": "tiny", "workload": {"kind": "alpaca", "num_requests": 1},
                           "runs": [{"name": "p", "engine": "llama-cpp", "parallel": 2}]})
    engine = make_engine(model, config.runs[0], requests)
    engine.serve(requests, lambda n: None)
    ours = {r.request_id: models.generate(model, [list(r.prompt)], 4, ignore_eos=True)[0] for r in requests}
    assert engine.outputs == ours
