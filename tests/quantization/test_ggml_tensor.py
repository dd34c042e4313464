"""llama.cpp blocks kept quantized as QuantizedTensor: the same bytes, bit-equal dequantization (our
blocks and the shipped SmolLM2 file's, checked against the `gguf` package), and the real model
loaded with its Q4_1 projections kept quantized giving the dequantized model's logits exactly."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.llama import forward
from quantization.ggml_formats import dequantize_blocks, quantize_blocks
from quantization.ggml_tensor import TENSOR_FORMATS, quantize_to_tensor, tensor_from_blocks
from quantization.quantized_tensor import QuantizedTensor


def test_keep_quantized_needs_gguf_weights():
    with pytest.raises(ValueError, match="keep_quantized applies to GGUF weights"):
        models.load("tiny", keep_quantized=True)


@pytest.mark.parametrize("name", TENSOR_FORMATS)
def test_same_bytes_and_bit_equal_values_as_the_blocks(rng, name):
    w = rng.standard_normal((576, 96)).astype(np.float32) * np.logspace(-3, 0, 96, dtype=np.float32)
    w[:32, 0] = 0.0  # an all-zero block
    tensor = quantize_to_tensor(w, name)
    blocks = quantize_blocks(w.T, name)
    assert tensor.shape == (576, 96) and tensor.nbytes == blocks.nbytes
    want = dequantize_blocks(blocks, name).reshape(96, 576).T
    np.testing.assert_array_equal(np.asarray(tensor.dequantize(jnp.float32)), want)
    rows = jnp.asarray([0, 31, 32, 575])
    np.testing.assert_array_equal(np.asarray(tensor.take_rows(rows, jnp.float32)), want[np.asarray(rows)])


def test_shipped_q4_1_tensor_dequantizes_like_gguf(smollm2):
    reader = gguf.GGUFReader(smollm2.gguf_path)
    tensor = next(t for t in reader.tensors if t.name == "blk.5.ffn_down.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
    kept = tensor_from_blocks(tensor.data, "Q4_1", int(tensor.shape[0]))
    assert kept.mins is not None and kept.bits == 4 and kept.nbytes == tensor.data.nbytes
    want = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(576, 1536).T
    np.testing.assert_array_equal(np.asarray(kept.dequantize(jnp.float32)), want)


def test_bad_blocks_are_named():
    with pytest.raises(ValueError, match=r"holds block formats \['Q4_0', 'Q4_1', 'Q8_0'\], got 'Q5_0'"):
        tensor_from_blocks(np.zeros((2, 22), np.uint8), "Q5_0", 32)
    with pytest.raises(ValueError, match=r"Q4_0 blocks for 64 inputs must be u8\[out, 36\]"):
        tensor_from_blocks(np.zeros((2, 18), np.uint8), "Q4_0", 64)


def test_real_model_on_kept_blocks_gives_the_dequantized_logits(smollm2):
    config, dense = smollm2.config, smollm2.params
    kept = models.load("smollm2-135m", keep_quantized=True, tokenizer=False).params
    layer = kept["layers"][0]
    assert all(isinstance(layer[k], QuantizedTensor) and layer[k].mins is not None
               for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
    np.testing.assert_array_equal(np.asarray(kept["layers"][7]["wk"].dequantize(jnp.float32)),
                                  np.asarray(dense["layers"][7]["wk"]))  # q/k rows unpermuted as blocks
    tokens, positions = jnp.asarray([[1, 504, 3458, 314, 260, 1747]]), jnp.arange(6)[None]
    run = jax.jit(lambda params: forward(params, tokens, positions, config=config)[0])
    np.testing.assert_array_equal(np.asarray(run(kept)), np.asarray(run(dense)))
