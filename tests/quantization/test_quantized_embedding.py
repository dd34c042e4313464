"""The tied embedding table as Q8_0 blocks (`quantization/quantized_embedding.py`): one leaf for the
lookup and the LM head, exactly llama.cpp's blocks, applied by the 4-bit schemes only."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.llama import forward
from models.ops import Ops
from quantization.ggml_formats import dequantize_blocks, quantize_blocks
from quantization.ggml_params import blocks_as_tensors, round_through_blocks
from quantization.gguf_export import _tensor_format
from quantization.quantized_embedding import QuantizedEmbedding, quantize_embedding
from quantization.schemes import quantize_params


@pytest.fixture(scope="module")
def tied_model() -> models.Model:
    """A small tied model whose every row (64, 96 wide) cuts into llama.cpp blocks of 32."""
    config = models.get_preset("tiny").replace(name="tiny-tied", hidden_size=64, intermediate_size=96, num_heads=4,
                                               head_dim=16, tie_word_embeddings=True)
    return models.Model(config, models.init_params(config, seed=3))


def test_the_leaf_is_llama_cpps_q8_0_blocks_for_lookup_and_head(tied_model, rng):
    table = tied_model.params["embed"]  # f32[vocab, hidden]
    leaf = quantize_embedding(tied_model.params)["embed"]
    assert isinstance(leaf, QuantizedEmbedding) and leaf.shape == table.shape and leaf.dtype == jnp.float32
    want = dequantize_blocks(quantize_blocks(np.asarray(table), "Q8_0"), "Q8_0").reshape(table.shape)
    np.testing.assert_array_equal(np.asarray(leaf.dequantize()), want)  # bit-exact Q8_0
    assert leaf.nbytes == table.size * 34 // 32  # 8.5 bits per weight
    tokens = jnp.asarray([[0, 5, 262], [7, 7, 1]])
    np.testing.assert_array_equal(np.asarray(Ops().embed(leaf, tokens)), want[np.asarray(tokens)])
    x = jnp.asarray(rng.standard_normal((3, 64)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(Ops().logits(x, leaf, transposed=True)), np.asarray(x) @ want.T,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="transposed=True"):
        Ops().logits(x, leaf)


def test_requantizing_a_q8_0_table_gives_back_its_blocks(tied_model):
    """Our base SmolLM2 table is the shipped Q8_0 table dequantized: quantizing it again adds no error."""
    once = quantize_embedding(tied_model.params)["embed"]
    twice = quantize_embedding({**tied_model.params, "embed": once.dequantize()})["embed"]
    np.testing.assert_array_equal(np.asarray(twice.weight.values), np.asarray(once.weight.values))
    np.testing.assert_array_equal(np.asarray(twice.weight.scales), np.asarray(once.weight.scales))


def test_only_the_4_bit_schemes_quantize_a_tied_table_that_cuts_into_blocks(tied_model, tiny_model):
    assert isinstance(quantize_params(tied_model.params, "int4-g32")["embed"], QuantizedEmbedding)
    assert isinstance(blocks_as_tensors(tied_model.params, "Q4_0")["embed"], QuantizedEmbedding)
    assert isinstance(round_through_blocks(tied_model.params, "Q4_K")[0]["embed"], QuantizedEmbedding)
    for params in (quantize_params(tied_model.params, "int8"), quantize_params(tied_model.params, "w8a8"),
                   blocks_as_tensors(tied_model.params, "Q8_0")):
        assert params["embed"] is tied_model.params["embed"]
    # the tiny model has its own lm_head (and 48-wide rows): its table stays in float
    assert quantize_params(tiny_model.params, "int4-g32")["embed"] is tiny_model.params["embed"]
    assert (_tensor_format("token_embd.weight", "Q4_0", 576), _tensor_format("token_embd.weight", "Q8_0", 576),
            _tensor_format("token_embd.weight", None, 576)) == ("Q8_0", "F32", "F32")


def test_the_model_runs_on_the_quantized_table(tied_model):
    params = quantize_params(tied_model.params, "int4-g32")
    tokens = jnp.asarray([[1, 9, 40, 7, 200]])
    positions = jnp.arange(5)[None]
    got = forward(params, tokens, positions, config=tied_model.config)[0]
    dense = {**params, "embed": params["embed"].dequantize()}  # the same weights, the table as an array
    want = forward(dense, tokens, positions, config=tied_model.config)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
