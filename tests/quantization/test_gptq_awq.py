"""GPTQ and AWQ: both cut the output error of round-to-nearest on correlated, outlier-heavy
activations, as much as qwix's implementations do on the same weights (qwix.contrib as the oracle);
GPTQ's act-order and ragged groups; AWQ's folded scales leave the float model unchanged; the
schemes run the model from calibration statistics."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from qwix._src.core import qarray
from qwix.contrib import awq_core, gptq_core

import quantization.awq as awq
from experiments.quant_calibration import activation_stats
from models.config import ModelConfig
from models.llama import forward, init_params
from quantization.activation_stats import ActivationStats
from quantization.gptq import gptq_quantize
from quantization.quantized_tensor import QuantizedTensor
from quantization.schemes import quantize_params
from quantization.weight_only import quantize_weight


def activations(rng, tokens: int, width: int) -> np.ndarray:
    """f64[tokens, width]: correlated channels, four of them 10x larger (LLM-style outliers)."""
    x = rng.standard_normal((tokens, width)) @ (np.eye(width) + rng.standard_normal((width, width)) / width ** 0.5)
    x[:, :4] *= 10
    return x


def dense_error(stats: ActivationStats, quantized: QuantizedTensor, w: np.ndarray, row_scale=1.0) -> float:
    return stats.output_error(np.asarray(quantized.dequantize(jnp.float32), np.float64) / row_scale - w)


def test_gptq_cuts_rtn_error_as_much_as_qwix(rng):
    x, w = activations(rng, 1024, 64), rng.standard_normal((64, 48)).astype(np.float32) / 10
    calib, held_out = ActivationStats.of(x[:512], hessian=True), ActivationStats.of(x[512:], hessian=True)
    ours = dense_error(held_out, gptq_quantize(w, calib.hessian, 4, 32), w) / dense_error(
        held_out, quantize_weight(jnp.asarray(w), 4, 32), w)
    how = qarray.HowToQuantize(qtype=jnp.int4, channelwise_axes=[0], tiled_axes={1: 32}, calibration_method="absmax")
    theirs_q, _ = gptq_core.quantize_weight(jnp.asarray(w.T), jnp.asarray(calib.hessian, jnp.float32), how, blocksize=32)
    dequantized = lambda q: np.asarray(qarray.dequantize(q), np.float64).T  # noqa: E731
    theirs = held_out.output_error(dequantized(theirs_q) - w) / held_out.output_error(
        dequantized(qarray.quantize(jnp.asarray(w.T), how)) - w)
    print(f"GPTQ error / RTN error on held-out tokens: ours {ours:.3f}, qwix {theirs:.3f}")
    assert ours < 0.6 and ours < theirs * 1.1


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_ragged_groups_and_act_order(rng, act_order):
    """576 rows in groups of 128 (a ragged last group of 64): the usual QuantizedTensor layout, codes
    in range, and less calibration error than round-to-nearest with the same layout."""
    x, w = activations(rng, 2048, 576), rng.standard_normal((576, 32)).astype(np.float32) / 10
    stats = ActivationStats.of(x, hessian=True)
    q = gptq_quantize(w, stats.hessian, 4, 128, act_order=act_order)
    rtn = quantize_weight(jnp.asarray(w), 4, 128)
    assert q.scales.shape == rtn.scales.shape == (5, 32) and q.values.shape == rtn.values.shape
    assert np.asarray(q.codes()).min() >= -8 and np.asarray(q.codes()).max() <= 7
    assert dense_error(stats, q, w) < 0.7 * dense_error(stats, rtn, w)


def test_awq_scale_search_matches_qwix_and_never_loses_to_rtn(rng):
    x, w = activations(rng, 2048, 128), rng.standard_normal((128, 64)).astype(np.float32) / 10
    stats = ActivationStats.of(x, hessian=True)
    s, alpha = awq.search_scales([w], stats, 4, 32, symmetric=False)
    ours = dense_error(stats, quantize_weight(jnp.asarray(w * s[:, None]), 4, 32, False), w, s[:, None])
    rtn = dense_error(stats, quantize_weight(jnp.asarray(w), 4, 32, False), w)
    how = qarray.HowToQuantize(qtype=jnp.int4, channelwise_axes=[0], tiled_axes={1: 32}, calibration_method="minmax")
    theirs_q, theirs_s = awq_core.quantize_weight(jnp.asarray(w.T), awq_core.compute_act_scale(jnp.asarray(x)), how)
    theirs = stats.output_error((np.asarray(qarray.dequantize(theirs_q), np.float64) / np.asarray(theirs_s)).T - w)
    print(f"output error: AWQ ours {ours:.0f} (alpha {alpha}), qwix {theirs:.0f}, RTN {rtn:.0f}")
    assert 0 < alpha and ours < 0.7 * rtn and ours <= theirs * 1.02


# one kv head per head, so AWQ also scales o (folded into v's columns)
MHA = ModelConfig(name="mha", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=4, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  max_position_embeddings=64, bos_token_id=1, eos_token_ids=(2,))


def test_awq_folded_scales_leave_the_float_model_unchanged(rng, monkeypatch):
    """With rounding switched off, AWQ's transformation (rows scaled up, norms / up / v columns scaled
    down) is exact: the logits do not move, while every scaled leaf did."""
    params = init_params(MHA, seed=0)
    scales = {}

    def random_scales(weights, stats, *args):
        scales[len(scales)] = s = rng.uniform(0.5, 2.0, weights[0].shape[0]).astype(np.float32)
        return s, 0.5
    monkeypatch.setattr(awq, "search_scales", random_scales)
    monkeypatch.setattr(awq, "quantize_weight", lambda w, *args, **kwargs: w)
    stats = {f"layers.{i}.{n}": ActivationStats(np.ones(1), np.ones(1), 1, np.ones((1, 1)))
             for i in range(MHA.num_layers) for n in ("wq", "w_gate", "w_down", "wo")}
    folded = awq.awq_params(params, stats, 4, 32)
    assert len(scales) == 4 * MHA.num_layers
    for key in ("attn_norm", "mlp_norm", "wq", "wv", "wo", "w_up", "w_down"):
        assert not np.allclose(np.asarray(folded["layers"][0][key]), np.asarray(params["layers"][0][key])), key
    tokens, positions = jnp.asarray([[5, 17, 42, 3, 88, 1]]), jnp.arange(6)[None]
    want = np.asarray(forward(params, tokens, positions, config=MHA)[0])
    np.testing.assert_allclose(np.asarray(forward(folded, tokens, positions, config=MHA)[0]), want,
                               atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("scheme, rtn", [("gptq-int4-g32", "int4-g32"), ("gptq-int4-g128-act", "int4-g128"),
                                         ("awq-int4-g32", "int4-g32-asym")])
def test_schemes_run_the_model_from_calibration(tiny_model, scheme, rtn):
    """A model with a few outlier channels (norm weights 8x on three channels, as LLMs have): on the
    calibration tokens its logits move less than under round-to-nearest with the same layout."""
    layers = [{**layer, "attn_norm": layer["attn_norm"].at[:3].multiply(8.0),
               "mlp_norm": layer["mlp_norm"].at[5:8].multiply(8.0)} for layer in tiny_model.params["layers"]]
    model = dataclasses.replace(tiny_model, params={**tiny_model.params, "layers": layers})
    tokens = jnp.asarray(np.arange(1, 129).reshape(2, 64))
    calibration = activation_stats(model, tokens, hessian=True)
    params = quantize_params(model.params, scheme, calibration)
    assert all(isinstance(params["layers"][1][k], QuantizedTensor) and params["layers"][1][k].bits == 4
               for k in ("wq", "wo", "w_down"))
    positions = jnp.broadcast_to(jnp.arange(64), tokens.shape)
    run = lambda p: np.asarray(forward(p, tokens, positions, config=model.config)[0])  # noqa: E731
    base = run(model.params)
    errors = {name: np.abs(run(p) - base).mean() for name, p in
              {scheme: params, rtn: quantize_params(model.params, rtn)}.items()}
    print(errors)
    assert errors[scheme] < errors[rtn]


def test_hessian_schemes_need_hessians(tiny_model):
    with pytest.raises(ValueError, match="'gptq-int4-g64' needs calibration"):
        quantize_params(tiny_model.params, "gptq-int4-g64")
    no_hessian = activation_stats(tiny_model, [[3, 17, 200, 5]])
    with pytest.raises(ValueError, match="gptq needs the calibration Hessian"):
        quantize_params(tiny_model.params, "gptq-int4-g64", no_hessian)
    with pytest.raises(ValueError, match="awq needs calibration statistics with a Hessian for layers.0.wq"):
        quantize_params(tiny_model.params, "awq-int4-g64", no_hessian)
