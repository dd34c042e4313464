"""Weight-only int8 / int4 quantization: error bounds per element, ragged groups, int4 packing,
qwix as the oracle for the error, and `quantize_params` through the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.llama import forward
from quantization.quantized_tensor import QuantizedTensor, pack_int4, unpack_int4
from quantization.schemes import parse_scheme, quantize_params
from quantization.weight_only import quantize_weight


def weight(rng, rows=576, cols=96):
    """f32[rows, cols] with column scales spread over two decades and a few outliers."""
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.logspace(-2, 0, cols, dtype=np.float32)
    w[rng.integers(0, rows, 10), rng.integers(0, cols, 10)] *= 20
    return jnp.asarray(w)


@pytest.mark.parametrize("bits,group,symmetric", [(8, 0, True), (8, 0, False), (8, 64, True),
                                                  (4, 32, True), (4, 128, True), (4, 128, False), (4, 0, True)])
def test_every_weight_within_half_a_step(rng, bits, group, symmetric):
    w = weight(rng)
    q = quantize_weight(w, bits, group, symmetric)
    assert q.shape == w.shape and q.bits == bits
    groups = -(-576 // group) if group else 1
    assert q.scales.shape == (groups, 96)
    step = np.repeat(np.asarray(q.scales), group or 576, axis=0)[:576]  # f32[rows, cols]
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
    assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-12)


def test_ragged_last_group_is_its_own_group(rng):
    """576 rows in groups of 128: groups 0-3 full, group 4 the last 64 rows, scaled by them alone."""
    w = np.asarray(weight(rng))
    q = quantize_weight(jnp.asarray(w), 4, 128)
    assert q.scales.shape == (5, 96)
    np.testing.assert_allclose(np.asarray(q.scales[4]), np.abs(w[512:]).max(0) / 7, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.scales[0]), np.abs(w[:128]).max(0) / 7, rtol=1e-6)


@pytest.mark.parametrize("rows", [6, 7])
@pytest.mark.parametrize("signed", [True, False])
def test_int4_packing_round_trips(rng, rows, signed):
    codes = rng.integers(-8 if signed else 0, 8 if signed else 16, (rows, 5))
    packed = pack_int4(jnp.asarray(codes))
    assert packed.dtype == jnp.uint8 and packed.shape == (-(-rows // 2), 5)
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed, signed))[:rows], codes)


@pytest.mark.parametrize("rows,symmetric", [(576, True), (101, False)])
def test_int4_leaf_holds_half_a_byte_per_weight_and_looks_up_rows(rng, rows, symmetric):
    w = weight(rng, rows=rows)
    q = quantize_weight(w, 4, 32, symmetric)
    assert q.values.shape == (-(-rows // 2), 96) and q.shape == (rows, 96)
    dense = np.asarray(q.dequantize())
    index = jnp.array([[0, 1, rows - 1], [rows // 2, 33, 2]])
    np.testing.assert_array_equal(np.asarray(q.take_rows(index)), dense[np.asarray(index)])


@pytest.mark.parametrize("qtype,bits,tiles", [("int8", 8, None), ("int4", 4, 64)])
def test_error_next_to_qwix(rng, qtype, bits, tiles):
    """qwix scales by absmax / (qmax + 0.5) with codes down to -qmax - 1, we by absmax / qmax: the
    errors on the same weights agree to within a few percent (ours printed next to qwix's)."""
    qwix = pytest.importorskip("qwix", reason="qwix is the oracle: pip install -e '.[test]'")
    w = weight(rng)
    theirs = qwix.dequantize(qwix.quantize(w, qtype, channelwise_axes=[1],
                                           tiled_axes={0: tiles} if tiles else None))
    ours = quantize_weight(w, bits, tiles or 0).dequantize()
    rms = {name: float(jnp.sqrt(jnp.mean((x - w) ** 2))) for name, x in (("ours", ours), ("qwix", theirs))}
    print(qtype, rms)
    assert 0.9 < rms["ours"] / rms["qwix"] < 1.1


def test_quantize_params_replaces_projections_only(tiny_model):
    q = quantize_params(tiny_model.params, "int4-g32-asym")
    layer = q["layers"][0]
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        assert isinstance(layer[name], QuantizedTensor) and layer[name].bits == 4 and layer[name].zeros is not None
    assert not isinstance(q["embed"], QuantizedTensor) and layer["attn_norm"] is tiny_model.params["layers"][0]["attn_norm"]
    assert quantize_params(tiny_model.params, "none") is tiny_model.params


def test_quantized_model_logits_follow_the_bits(tiny_model):
    """Through the unchanged model (and jax.jit): int8 stays close to f32, int4 further, and every
    scheme is finite. (Group size is compared on the real model in the experiment: the tiny model's
    48 / 101-row matrices hold at most two groups of 32 and fewer than one of 128.)"""
    tokens, positions = jnp.array([[3, 17, 200, 5, 9, 44, 81, 2]]), jnp.arange(8)[None]
    run = jax.jit(lambda p: forward(p, tokens, positions, config=tiny_model.config)[0])
    base = run(tiny_model.params)
    schemes = ("none", "int8", "int8-asym", "int4-g32", "int4-g32-asym")
    err = {s: float(jnp.abs(run(quantize_params(tiny_model.params, s)) - base).mean()) for s in schemes}
    assert err["none"] < 1e-6
    assert err["int8"] < 0.1 * err["int4-g32"] and err["int8-asym"] < 0.1 * err["int4-g32-asym"]
    assert min(v for s, v in err.items() if s.startswith("int4")) > max(err["int8"], err["int8-asym"])
    assert all(np.isfinite(v) for v in err.values())


def test_bad_schemes_are_named(tiny_model):
    with pytest.raises(ValueError, match=r"quantization must be one of \['none', 'int8'.*got 'int4-g48'"):
        parse_scheme("int4-g48")
    with pytest.raises(ValueError, match="got 'fp8'"):
        quantize_params(tiny_model.params, "fp8")
    with pytest.raises(ValueError, match="takes no calibration"):
        quantize_params(tiny_model.params, "int8", calibration=[[1, 2, 3]])
    with pytest.raises(ValueError, match=r"layers\[0\].wq is already quantized"):
        quantize_params(quantize_params(tiny_model.params, "int8"), "int8")
    assert parse_scheme("int4-g128-asym").name == "int4-g128-asym"
