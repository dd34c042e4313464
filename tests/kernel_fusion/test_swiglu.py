"""Fused SwiGLU activation: the interpreted Pallas kernel and its reference against the unfused
gate / up matmuls of the model (`models.ops.Ops.swiglu_mlp` without its down projection), the CUDA
(Triton) lowering, and input validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_fusion.swiglu import fused_swiglu, fused_swiglu_reference, largest_pow2_divisor

# relative to the output's largest magnitude: f32 differs by summation order, bf16 by where the
# products are rounded (the unfused op rounds each matmul's output, the fused one only the result)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(rows_shape, hidden, inter, dtype, seed=0):
    kx, kg, ku = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (*rows_shape, hidden), jnp.float32).astype(dtype)
    w_gate, w_up = (jax.random.normal(k, (hidden, inter), jnp.float32).astype(dtype) / hidden ** 0.5
                    for k in (kg, ku))
    return x, w_gate, w_up


def unfused(x, w_gate, w_up):
    """The model's op sequence: two matmuls in x's dtype, then SiLU and multiply."""
    return jax.nn.silu(x @ w_gate) * (x @ w_up)


@pytest.mark.parametrize("rows_shape, hidden, inter", [((5,), 576, 1536), ((2, 3), 64, 48), ((1,), 32, 16),
                                                      ((40,), 96, 160)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_and_reference_match_the_unfused_matmuls(rows_shape, hidden, inter, dtype):
    x, w_gate, w_up = _inputs(rows_shape, hidden, inter, dtype)
    w_gate_up = jnp.concatenate([w_gate, w_up], axis=1)
    expected = np.asarray(unfused(x, w_gate, w_up), np.float32)
    scale = np.abs(expected).max()
    reference = fused_swiglu_reference(x, w_gate_up)
    kernel = fused_swiglu(x, w_gate_up, interpret=True)
    assert kernel.shape == reference.shape == (*rows_shape, inter) and kernel.dtype == reference.dtype == dtype
    np.testing.assert_allclose(np.asarray(reference, np.float32), expected, atol=TOL[dtype] * scale)
    # kernel and reference both accumulate in f32 and round once: they agree to f32 summation order
    np.testing.assert_allclose(np.asarray(kernel, np.float32), np.asarray(reference, np.float32),
                               atol=(1e-5 if dtype == jnp.float32 else 8e-3) * scale)


def test_largest_pow2_divisor():
    assert [largest_pow2_divisor(n, 64) for n in (576, 96, 48, 7, 1024)] == [64, 32, 16, 1, 64]


@pytest.mark.parametrize("rows", [1, 37])
def test_lowers_to_triton_for_cuda(rows):
    x = jax.ShapeDtypeStruct((rows, 576), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((576, 2 * 1536), jnp.bfloat16)
    exported = jax.export.export(jax.jit(fused_swiglu), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(x, w)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


@pytest.mark.parametrize("fn", [fused_swiglu, fused_swiglu_reference])
@pytest.mark.parametrize("x_shape, w_shape", [((4, 16), (8, 32)), ((4, 16), (16, 33)), ((4, 16), (16,))])
def test_bad_shapes_name_both_arrays(fn, x_shape, w_shape):
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., hidden\] and w_gate_up \[hidden, 2 \* intermediate\]"):
        fn(jnp.zeros(x_shape), jnp.zeros(w_shape))


def test_kernel_limits_are_named():
    with pytest.raises(ValueError, match="block_rows must be a power of two >= 16"):
        fused_swiglu(jnp.zeros((4, 32)), jnp.zeros((32, 64)), interpret=True, block_rows=8)
    with pytest.raises(ValueError, match=r"hidden \(24\) and intermediate \(32\) must be multiples of 16"):
        fused_swiglu(jnp.zeros((4, 24)), jnp.zeros((24, 64)), interpret=True)
