"""W8A8 (int8 x int8 -> int32 matmuls), SmoothQuant smoothing, static per-tensor activation scales,
and the calibration that feeds them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.quant_calibration import activation_stats
from models.llama import forward
from models.ops import Ops
from quantization.schemes import quantize_params
from quantization.w8a8 import W8A8Tensor, quantize_activations, quantize_w8a8


def activations_with_outliers(rng, tokens=64, channels=576, outliers=(7, 300), size=1000.0):
    """f32[tokens, channels]: O(1) activations, except that the first two tokens carry `size` in a
    few channels (the "massive activations" of attention-sink tokens that SmoothQuant and later
    work observe in LLMs)."""
    x = rng.standard_normal((tokens, channels)).astype(np.float32)
    x[:2, list(outliers)] = size * np.sign(x[:2, list(outliers)])
    return jnp.asarray(x)


def relative_error(got, want):
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def test_per_token_w8a8_is_close_and_compiles_to_an_int8_dot(rng):
    x = jnp.asarray(rng.standard_normal((5, 576)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((576, 96)).astype(np.float32) * 0.05)
    q = quantize_w8a8(w)
    assert q.values.dtype == jnp.int8 and q.scales.shape == (96,) and q.act_scale is None
    assert relative_error(q.matmul(x), x @ w) < 0.02
    hlo = jax.jit(lambda x, q: q.matmul(x)).lower(x, q).compile().as_text()
    assert "s32[5,96]" in hlo and "s8[5,576]" in hlo  # the dot multiplies int8 operands into int32



def test_a_single_row_runs_as_a_two_row_int8_dot(rng):
    """XLA CPU's one-row s8 dot is a slow generic loop: one token is padded to two rows, the
    padding row dropped, and the result is that of the unpadded product."""
    w = jnp.asarray(rng.standard_normal((576, 96)).astype(np.float32) * 0.05)
    q = quantize_w8a8(w)
    x = jnp.asarray(rng.standard_normal((3, 576)).astype(np.float32))
    for one in (x[:1], x[0]):  # a [1, in] row and a bare [in] vector
        got = q.matmul(one)
        assert got.shape == one.shape[:-1] + (96,)
        np.testing.assert_array_equal(np.asarray(got).reshape(96), np.asarray(q.matmul(x[:2]))[0])
        hlo = jax.jit(lambda x, q: q.matmul(x)).lower(one, q).compile().as_text()
        assert "s32[2,96]" in hlo and "s32[1,96]{1,0} dot" not in hlo
    unpadded = jax.jit(lambda x, q: q.matmul(x, pad_single_row=False)).lower(x[:1], q).compile().as_text()
    assert "s32[2,96]" not in unpadded  # what matvec_chain times as XLA's own one-row s8 dot
    np.testing.assert_array_equal(np.asarray(q.matmul(x[:1], pad_single_row=False)), np.asarray(q.matmul(x[:1])))


def test_activations_quantize_per_token_or_per_tensor_and_zero_tokens_keep_scale_one():
    x = jnp.asarray([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [254.0, 1.0, -127.0]])
    smooth = jnp.asarray([1.0, 2.0, 1.0])
    codes, act = quantize_activations(x, smooth, None)  # x / smooth: [[0, 0, 0], [1, -1, .5], [254, .5, -127]]
    np.testing.assert_allclose(np.asarray(act)[:, 0], [1.0, 1 / 127, 2.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(codes), [[0, 0, 0], [127, -127, 64], [127, 0, -64]])
    assert codes.dtype == jnp.int8
    codes, act = quantize_activations(x, None, jnp.float32(1.0))  # one static scale: big values clip
    np.testing.assert_array_equal(np.asarray(codes), [[0, 0, 0], [1, -2, 0], [127, 1, -127]])
    assert act.shape == ()


def test_smoothing_moves_outliers_into_the_weights_exactly(rng):
    """x / s times W * s is x times W: the smoothed leaf dequantizes back to W within half an int8
    step of the smoothed weight, divided by s."""
    x = activations_with_outliers(rng)
    w = jnp.asarray(rng.standard_normal((576, 96)).astype(np.float32) * 0.05)
    q = quantize_w8a8(w, jnp.max(jnp.abs(x), axis=0), smooth_alpha=0.5)
    assert q.smooth.shape == (576,) and float(q.smooth[7]) > 10 * float(jnp.median(q.smooth))
    step = np.asarray(q.scales)[None, :] / np.asarray(q.smooth)[:, None]
    assert np.all(np.abs(np.asarray(q.dequantize() - w)) <= step / 2 * (1 + 1e-5))


def test_per_tensor_scale_collapses_on_outlier_tokens_and_smoothing_rescues_it(rng):
    """One static scale must cover the massive activations, which leaves the ordinary tokens almost
    no int8 levels: their outputs collapse (relative error near 1), where per-token scales stay
    within a few percent; smoothing the outlier channels into the weights brings the static scale
    back to a usable error."""
    x = activations_with_outliers(rng)
    w = jnp.asarray(rng.standard_normal((576, 96)).astype(np.float32) * 0.05)
    absmax = jnp.max(jnp.abs(x), axis=0)
    want = (x @ w)[2:]  # the ordinary tokens
    err = {name: relative_error(quantize_w8a8(w, absmax, **kw).matmul(x)[2:], want) for name, kw in {
        "per_token": {}, "per_tensor": dict(per_tensor=True),
        "per_tensor_smooth": dict(per_tensor=True, smooth_alpha=0.5)}.items()}
    print(err)
    assert err["per_token"] < 0.03 and err["per_tensor"] > 0.9
    assert err["per_tensor_smooth"] < err["per_tensor"] / 3


def test_calibration_records_each_projection_input(tiny_model):
    tokens = [[3, 17, 200, 5, 9, 44], [8, 8, 2, 1, 1, 7]]
    stats = activation_stats(tiny_model, tokens, hessian=True)
    params, config = tiny_model.params, tiny_model.config
    assert len(stats) == 7 * config.num_layers
    # layer 0's q/k/v input is the first RMSNorm of the embeddings, over both sequences' tokens
    hidden = params["embed"][jnp.asarray(tokens[0] + tokens[1])]
    normed = np.asarray(Ops().rms_norm(hidden, params["layers"][0]["attn_norm"], config.rms_norm_eps)[0], np.float64)
    q_input = stats["layers.0.wq"]
    assert q_input.tokens == 12
    np.testing.assert_allclose(q_input.absmax, np.abs(normed).max(0), rtol=1e-6)
    np.testing.assert_allclose(q_input.mean_abs, np.abs(normed).mean(0), rtol=1e-5)
    np.testing.assert_allclose(q_input.hessian, normed.T @ normed, rtol=1e-5)
    assert stats["layers.1.w_down"].absmax.shape == (config.intermediate_size,)


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-tensor-smooth"])  # per-token, and calibrated + smoothed
def test_w8a8_schemes_run_the_model(tiny_model, scheme):
    tokens, positions = jnp.array([[3, 17, 200, 5, 9, 44, 81, 2]]), jnp.arange(8)[None]
    calibration = None if scheme == "w8a8" else activation_stats(tiny_model, [[3, 17, 200, 5, 9, 44, 81, 2, 7, 11]])
    params = quantize_params(tiny_model.params, scheme, calibration)
    assert isinstance(params["layers"][2]["w_up"], W8A8Tensor)
    run = jax.jit(lambda p: forward(p, tokens, positions, config=tiny_model.config)[0])
    base = run(tiny_model.params)
    assert relative_error(run(params), base) < 0.05


def test_calibrated_schemes_need_calibration(tiny_model):
    with pytest.raises(ValueError, match="'w8a8-smooth' needs calibration"):
        quantize_params(tiny_model.params, "w8a8-smooth")
    with pytest.raises(ValueError, match="no activation statistics for layers.0.wq"):
        quantize_params(tiny_model.params, "w8a8-tensor", {"layers.0.wk": jnp.ones(48)})
