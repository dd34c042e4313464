"""The decode-speed baselines: llama.cpp's F32 GGUF conversion, the optional-engine skip, the GEMM
roofline's FLOP count, and both decode configs end to end on their smoke sizes."""

from __future__ import annotations

import sys

import gguf
import numpy as np
import pytest

import models
from experiments.baselines.llama_cpp import f32_gguf
from experiments.config import parse_config
from experiments.engines import OptionalEngineMissing, make_engine
from experiments.roofline import matmul_flops_per_token
from experiments.run import run_experiment
from models.config import PRESETS
from models.loading import params_to_hf_state_dict
from tests.models.test_loading import HF_TO_GGUF, LAYER_TO_GGUF, assert_params_equal, llama_cpp_permute


def write_quantized_gguf(path, model: models.Model) -> None:
    """A llama.cpp-style GGUF of `model` with its matrices in F16 (norms F32) and a toy vocab (the
    tiny shapes fit no 32-wide quantization block)."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_ids[0])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    for name, array in params_to_hf_state_dict(model.params, config).items():
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            module = ".".join(rest[:-1])
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = config.num_heads if module == "self_attn.q_proj" else config.num_kv_heads
                array = llama_cpp_permute(array, heads)
            name = f"blk.{i}.{LAYER_TO_GGUF[module]}.weight"
        else:
            name = HF_TO_GGUF[name]
        array = np.ascontiguousarray(array, np.float32)
        writer.add_tensor(name, array.astype(np.float16) if array.ndim == 2 else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_f32_gguf_holds_the_dequantized_weights_and_the_same_metadata(tiny_model, tmp_path):
    source, dest = tmp_path / "tiny.F16.gguf", tmp_path / "tiny.F32.gguf"
    write_quantized_gguf(source, tiny_model)
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
                 {"name": "ours", "engine": "continuous", "kv_cache_tokens": 128}],
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
