"""llama.cpp block formats: bit-exact with llama.cpp's own quantizer (libggml, through ctypes) and
with the `gguf` package, on random tensors with the edge cases the C code branches on and on the
real SmolLM2 weights (whose shipped Q4_1 / Q8_0 blocks re-quantize to the same bytes)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from models.model import find_packaged_gguf
from quantization.ggml_formats import FORMATS, dequantize_blocks, format_for_rows, quantize_blocks
from quantization.ggml_params import round_through_blocks
from quantization.libggml import ggml_quantize, load_libggml
from quantization.quantized_embedding import QuantizedEmbedding
from quantization.scheme_names import BLOCK_FORMAT_NAMES

LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_QUANTS = ["Q4_K", "Q6_K"]


@pytest.fixture(scope="module")
def libggml():
    lib = load_libggml()
    if lib is None:
        pytest.skip("llama.cpp's libggml-base is the oracle: install the extra, pip install -e '.[llama-cpp]'")
    return lib


def tricky_rows(rng, rows: int = 24, width: int = 1024) -> np.ndarray:
    """f32[rows, width]: Gaussian rows at scales from 1e-6 to 100, plus the cases the C code branches
    on: an all-zero block, a constant block, one-signed blocks, +/- ties of the largest magnitude,
    an outlier among tiny weights, values on exact code boundaries."""
    x = rng.standard_normal((rows, width)).astype(np.float32)
    x *= np.logspace(-6, 2, rows, dtype=np.float32)[:, None]
    x[0, :256] = 0.0
    x[1, :256] = 0.75
    x[2, :256] = np.abs(x[2, :256])
    x[3, :256] = -np.abs(x[3, :256])
    x[4, :32] = np.where(np.arange(32) % 2, 1.0, -1.0)
    x[5, :256] = 1e-3 * rng.standard_normal(256)
    x[5, 7] = 50.0
    x[6, :256] = np.arange(256) % 16 - 8.0  # already on a 4-bit grid
    x[7, :256] = 1e-30  # below every format's epsilon
    return x


@pytest.mark.parametrize("name", LEGACY + K_QUANTS)
def test_bit_exact_with_llama_cpp(name, libggml, rng):
    x = tricky_rows(rng)
    fmt = FORMATS[name]
    expected = ggml_quantize(libggml, x, fmt).reshape(-1, fmt.type_size)
    np.testing.assert_array_equal(quantize_blocks(x, name), expected)


@pytest.mark.parametrize("name", LEGACY)
def test_bit_exact_with_gguf_package(name, rng):
    x = tricky_rows(rng)
    qtype = gguf.GGMLQuantizationType[name]
    expected = gguf.quants.quantize(x, qtype).reshape(-1, FORMATS[name].type_size)
    np.testing.assert_array_equal(quantize_blocks(x, name), expected)


@pytest.mark.parametrize("name", LEGACY + K_QUANTS)
def test_layout_and_dequantize_match_gguf(name, rng):
    fmt = FORMATS[name]
    qtype = gguf.GGMLQuantizationType[name]
    assert (fmt.block_weights, fmt.type_size) == gguf.GGML_QUANT_SIZES[qtype]
    assert fmt.ggml_type == qtype.value
    blocks = quantize_blocks(tricky_rows(rng), name)
    expected = gguf.quants.dequantize(blocks.reshape(-1), qtype).reshape(-1, fmt.block_weights)
    np.testing.assert_array_equal(dequantize_blocks(blocks, name), expected)


@pytest.mark.parametrize("name", LEGACY + K_QUANTS)
def test_round_trip_error_is_a_fraction_of_the_block_range(name, rng):
    x = rng.standard_normal((8, 512)).astype(np.float32)
    fmt = FORMATS[name]
    x_hat = dequantize_blocks(quantize_blocks(x, name), name).reshape(x.shape)
    blocks = x.reshape(-1, fmt.block_weights)
    span = (blocks.max(1) - np.minimum(blocks.min(1), 0))[:, None]  # what one block's codes cover
    levels = {"Q4": 15, "Q5": 31, "Q6": 63, "Q8": 254}[name[:2]]
    assert np.all(np.abs(x_hat.reshape(blocks.shape) - blocks) <= 1.01 * span / levels)


def test_shipped_blocks_decode_and_requantize_to_the_same_bytes():
    """SmolLM2's GGUF was written by llama.cpp (Q4_1, token embedding Q8_0): our dequantize gives
    gguf's values and re-quantizing them reproduces every shipped block."""
    reader = gguf.GGUFReader(find_packaged_gguf("smollm2-135m"))
    checked = set()
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        if name not in FORMATS or not (tensor.name.startswith(("blk.0.", "blk.29.", "token_embd"))):
            continue
        raw = np.asarray(tensor.data).reshape(-1, FORMATS[name].type_size)
        weights = dequantize_blocks(raw, name)
        np.testing.assert_array_equal(weights.reshape(-1),
                                      gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(-1))
        np.testing.assert_array_equal(quantize_blocks(weights, name), raw, err_msg=tensor.name)
        checked.add(name)
    assert checked == {"Q4_1", "Q8_0"}


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quants_on_real_weights(name, libggml):
    """ffn_down rows are 1536 wide (6 super-blocks); the other SmolLM2 matrices have 576-wide rows,
    which K-quants cannot cut (llama-quantize falls back to another format for those)."""
    reader = gguf.GGUFReader(find_packaged_gguf("smollm2-135m"))
    tensor = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    x = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)[:96]  # f32[96, 1536]
    fmt = FORMATS[name]
    np.testing.assert_array_equal(quantize_blocks(x, name), ggml_quantize(libggml, x, fmt).reshape(-1, fmt.type_size))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"one of \['Q4_0'.*got 'Q3_K'"):
        quantize_blocks(np.zeros(256, np.float32), "Q3_K")
    with pytest.raises(ValueError, match="multiple of 256, got shape \\(576,\\)"):
        quantize_blocks(np.zeros(576, np.float32), "Q4_K")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_blocks(np.full(32, np.nan, np.float32), "Q8_0")
    with pytest.raises(ValueError, match="whole number of 18-byte blocks"):
        dequantize_blocks(np.zeros(20, np.uint8), "Q4_0")


def test_formats_fall_back_as_llama_quantize_does():
    assert format_for_rows("Q4_K", 1536) == "Q4_K" and format_for_rows("Q4_K", 576) == "Q5_0"
    assert format_for_rows("Q6_K", 576) == "Q8_0" and format_for_rows("Q4_0", 48) == "F16"
    assert tuple(FORMATS) == BLOCK_FORMAT_NAMES


def test_round_through_blocks_rounds_each_projection_along_its_input_rows(rng):
    """A projection [in, out] is a GGUF tensor of `out` rows of `in` weights: blocks run along `in`."""
    wq = rng.standard_normal((576, 64)).astype(np.float32)
    w_down = rng.standard_normal((1536, 48)).astype(np.float32)
    params = {"embed": np.ones((4, 576), np.float32), "layers": [{"wq": wq, "w_down": w_down, "attn_norm": np.ones(576)}]}
    rounded, summary = round_through_blocks(params, "Q4_K")
    expected_wq = dequantize_blocks(quantize_blocks(wq.T, "Q5_0"), "Q5_0").reshape(64, 576).T
    np.testing.assert_array_equal(np.asarray(rounded["layers"][0]["wq"]), expected_wq)
    expected_down = dequantize_blocks(quantize_blocks(w_down.T, "Q4_K"), "Q4_K").reshape(48, 1536).T
    np.testing.assert_array_equal(np.asarray(rounded["layers"][0]["w_down"]), expected_down)
    assert summary["formats"] == {"Q5_0": 1, "Q4_K": 1} and summary["weights"] == wq.size + w_down.size
    assert summary["bytes"] == 64 * 576 // 32 * 22 + 48 * 1536 // 256 * 144
    assert rounded["layers"][0]["attn_norm"] is params["layers"][0]["attn_norm"]
    assert isinstance(rounded["embed"], QuantizedEmbedding)  # a 4-bit format: the tied table in Q8_0 blocks
    assert round_through_blocks(params, "Q5_0")[0]["embed"] is params["embed"]
