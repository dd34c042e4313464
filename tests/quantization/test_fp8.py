"""FP8 E4M3 weights: the same values as qwix's float8_e4m3fn quantization, per-channel scales
tracking columns of very different size where one per-tensor scale cannot, and the schemes
running the model (the dequant-matmul kernel reads FP8 codes: test_dequant_matmul.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from qwix._src.core import qarray

from models.llama import forward
from quantization.fp8 import E4M3_MAX, quantize_fp8
from quantization.schemes import quantize_params


def spread_weight(rng) -> jnp.ndarray:
    """f32[128, 96], column magnitudes spread over three decades."""
    return jnp.asarray(rng.standard_normal((128, 96)).astype(np.float32) * np.logspace(-3, 0, 96, dtype=np.float32))


@pytest.mark.parametrize("per_channel", [True, False])
def test_same_values_as_qwix(rng, per_channel):
    w = spread_weight(rng)
    ours = quantize_fp8(w, per_channel)
    assert ours.values.dtype == jnp.float8_e4m3fn and ours.nbytes == 128 * 96 + 96 * 4
    how = qarray.HowToQuantize(qtype=jnp.float8_e4m3fn, channelwise_axes=[1] if per_channel else [],
                               tiled_axes={}, calibration_method="absmax")
    theirs = qarray.dequantize(qarray.quantize(w, how))
    np.testing.assert_array_equal(np.asarray(ours.dequantize()), np.asarray(theirs))
    assert float(jnp.abs(ours.values.astype(jnp.float32)).max()) == E4M3_MAX


def test_exponent_range_covers_three_decades_per_tensor_but_not_five(rng):
    """Unlike int8, E4M3 keeps 3 mantissa bits from 2^-6 to 448 (and subnormals to 2^-9): one scale
    for the whole tensor still holds columns 1000x below the largest with per-channel's relative
    error; at 10^5 below they fall into the subnormals (or to zero) and only per-channel keeps them."""
    base = rng.standard_normal((128, 2)).astype(np.float32)
    relative = {}
    for decades in (3, 5):
        w = jnp.asarray(base * np.asarray([10.0 ** -decades, 1.0], np.float32))  # a small and a unit column
        for per_channel in (True, False):
            error = jnp.abs(quantize_fp8(w, per_channel).dequantize()[:, 0] - w[:, 0]).max()
            relative[decades, per_channel] = float(error / jnp.abs(w[:, 0]).max())
    print(relative)
    assert max(relative[3, True], relative[3, False], relative[5, True]) < 0.07
    assert relative[5, False] > 0.2


@pytest.mark.parametrize("scheme", ["fp8-e4m3", "fp8-e4m3-tensor"])
def test_schemes_run_the_model(tiny_model, scheme):
    params = quantize_params(tiny_model.params, scheme)
    assert params["layers"][0]["w_up"].values.dtype == jnp.float8_e4m3fn
    tokens, positions = jnp.asarray([[5, 17, 42, 3, 88, 1]]), jnp.arange(6)[None]
    base = np.asarray(forward(tiny_model.params, tokens, positions, config=tiny_model.config)[0])
    got = np.asarray(forward(params, tokens, positions, config=tiny_model.config)[0])
    assert np.abs(got - base).mean() < 0.15 * np.abs(base).mean()  # 3 mantissa bits: ~3% per weight
