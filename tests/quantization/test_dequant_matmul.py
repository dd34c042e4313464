"""The dequant-matmul kernel (interpreted) and its reference against a float64 matmul on the
dequantized weight, for every QuantizedTensor layout; the CUDA (Triton) lowering; the limits it
refuses by name; and the `pallas` ops set running a quantized model through it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.llama import forward, init_params
from quantization.dequant_matmul import dequant_matmul, dequant_matmul_reference, kernel_chunk
from quantization.fp8 import quantize_fp8
from quantization.ggml_tensor import quantize_to_tensor
from quantization.schemes import quantize_params
from quantization.weight_only import quantize_weight

# relative to the output's largest magnitude: f32 kernel vs reference differ by summation order;
# bf16 inputs are rounded once more on the way out
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}

LAYOUTS = {
    "int8": lambda w: quantize_weight(w, 8),
    "int8-asym": lambda w: quantize_weight(w, 8, symmetric=False),
    "int8-g32": lambda w: quantize_weight(w, 8, 32),
    "int4-g32": lambda w: quantize_weight(w, 4, 32),
    "int4-g64-asym": lambda w: quantize_weight(w, 4, 64, symmetric=False),
    "int4-per-channel": lambda w: quantize_weight(w, 4),
    "Q4_0": lambda w: quantize_to_tensor(w, "Q4_0"),
    "Q4_1": lambda w: quantize_to_tensor(w, "Q4_1"),  # mins
    "Q8_0": lambda w: quantize_to_tensor(w, "Q8_0"),
    "fp8-e4m3": lambda w: quantize_fp8(w),
}


def expected(x, weight) -> np.ndarray:
    """float64 x @ dequantized weight."""
    return np.asarray(x, np.float64) @ np.asarray(weight.dequantize(jnp.float32), np.float64)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("lead, dtype", [((3,), jnp.float32), ((2, 17), jnp.bfloat16)])
def test_kernel_and_reference_match_the_dequantized_matmul(rng, layout, lead, dtype):
    w = jnp.asarray(rng.standard_normal((128, 96)).astype(np.float32) / 10)
    weight = LAYOUTS[layout](w)
    x = jnp.asarray(rng.standard_normal((*lead, 128)).astype(np.float32)).astype(dtype)
    want = expected(x, weight)
    scale = np.abs(want).max()
    for fn in (dequant_matmul_reference, dequant_matmul):
        got = fn(x, weight, interpret=True)
        assert got.shape == (*lead, 96) and got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=TOL[dtype] * scale, err_msg=fn.__name__)


def test_chunks_stay_inside_one_group():
    w = jnp.ones((576, 64))
    assert kernel_chunk(quantize_weight(w, 8)) == 64  # per channel: 576 rows in chunks of 64
    assert kernel_chunk(quantize_weight(w, 4, 32)) == 32  # 16 byte rows: Triton's smallest dot
    assert kernel_chunk(quantize_weight(w, 4, 64)) == 64


@pytest.mark.parametrize("layout", ["int8", "int4-g64-asym", "Q4_1", "fp8-e4m3"])
def test_lowers_to_triton_for_cuda(layout):
    """Cross-lowering for CUDA on this CPU machine runs Pallas's Triton lowering rules."""
    weight = LAYOUTS[layout](jnp.zeros((576, 1536)))
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), weight)
    exported = jax.export.export(jax.jit(dequant_matmul), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        jax.ShapeDtypeStruct((1, 576), jnp.bfloat16), shapes)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def test_limits_are_named():
    with pytest.raises(ValueError, match=r"576 rows in groups of 128 leave a ragged last group"):
        dequant_matmul(jnp.zeros((1, 576)), quantize_weight(jnp.ones((576, 64)), 4, 128), interpret=True)
    with pytest.raises(ValueError, match=r"cols \(24\) divisible by 16"):
        dequant_matmul(jnp.zeros((1, 64)), quantize_weight(jnp.ones((64, 24)), 8), interpret=True)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., rows\] for a weight of shape \(64, 32\)"):
        dequant_matmul(jnp.zeros((1, 48)), quantize_weight(jnp.ones((64, 32)), 8), interpret=True)
    with pytest.raises(TypeError, match="weight must be a QuantizedTensor"):
        dequant_matmul_reference(jnp.zeros((1, 64)), jnp.ones((64, 32)))
    with pytest.raises(ValueError, match="block_rows must be a power of two >= 16"):
        dequant_matmul(jnp.zeros((1, 64)), quantize_weight(jnp.ones((64, 32)), 8), interpret=True, block_rows=8)


# every projection tiles: hidden 64, q/kv columns 64 / 32, intermediate 128
TILED = ModelConfig(name="tiled", vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, max_position_embeddings=64, bos_token_id=1, eos_token_ids=(2,))


@pytest.mark.parametrize("scheme", ["int8", "int4-g32-asym"])
def test_pallas_ops_run_quantized_projections_through_the_kernel(scheme, monkeypatch):
    """The `pallas` set's linear sends every projection to the kernel (counted) and the logits match
    the `xla` set's dequantize-then-matmul."""
    import models.ops

    calls = []
    kernel = models.ops.dequant_matmul
    monkeypatch.setattr(models.ops, "dequant_matmul", lambda x, w, **kw: calls.append(w.shape) or kernel(x, w, **kw))
    params = quantize_params(init_params(TILED, seed=0), scheme)
    tokens = jnp.asarray([[5, 17, 42, 3, 88, 1]])
    positions = jnp.arange(6)[None]
    want, _ = forward(params, tokens, positions, config=TILED, ops="xla")
    pallas = models.ops.get_ops("pallas")
    got, _ = forward(pallas.prepare_params(params), tokens, positions, config=TILED, ops=pallas)
    assert len(calls) == 7 * TILED.num_layers
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4 * np.abs(np.asarray(want)).max())
