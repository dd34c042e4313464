"""Fused residual add + RMSNorm: the interpreted Pallas kernel and its reference against the model's
own unfused op (`models.ops.Ops.rms_norm`), the CUDA (Triton) lowering, and input validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_fusion.rms_norm import fused_add_rms_norm, fused_add_rms_norm_reference
from models.ops import Ops

# the outputs differ from the unfused op only by the dtype's rounding of the same computation
TOL = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2}


def _inputs(shape, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    x, residual = (jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys[:2])
    weight = (1 + 0.1 * jax.random.normal(keys[2], shape[-1:], jnp.float32)).astype(dtype)
    return x, residual, weight


@pytest.mark.parametrize("fn", [fused_add_rms_norm, fused_add_rms_norm_reference])
@pytest.mark.parametrize("shape", [(5, 576), (2, 3, 64), (1, 96), (33, 130)])  # SmolLM2's 576 is no power of two
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_matches_the_models_rms_norm(fn, shape, dtype, with_residual):
    x, residual, weight = _inputs(shape, dtype)
    residual = residual if with_residual else None
    expected_normed, expected_sum = Ops().rms_norm(x, weight, 1e-5, residual)
    normed, summed = fn(x, residual, weight, eps=1e-5, **({"interpret": True} if fn is fused_add_rms_norm else {}))
    assert normed.shape == summed.shape == shape and normed.dtype == summed.dtype == dtype
    np.testing.assert_array_equal(np.asarray(summed, np.float32), np.asarray(expected_sum, np.float32))
    np.testing.assert_allclose(np.asarray(normed, np.float32), np.asarray(expected_normed, np.float32),
                               atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("block_rows", [1, 4, 64])
def test_any_power_of_two_row_block_gives_the_same_rows(block_rows):
    x, residual, weight = _inputs((37, 80), jnp.float32, seed=1)
    expected = fused_add_rms_norm_reference(x, residual, weight, eps=1e-6)
    got = fused_add_rms_norm(x, residual, weight, eps=1e-6, interpret=True, block_rows=block_rows)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("with_residual", [True, False])
def test_lowers_to_triton_for_cuda(with_residual):
    """Cross-lowering for CUDA on this CPU machine runs Pallas's Triton lowering rules (not Triton's
    own compiler; a GPU run does)."""
    x = jax.ShapeDtypeStruct((37, 576), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((576,), jnp.bfloat16)
    fn = jax.jit(lambda a, r, w: fused_add_rms_norm(a, r, w, eps=1e-5))
    exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(x, x if with_residual else None, weight)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


@pytest.mark.parametrize("fn", [fused_add_rms_norm, fused_add_rms_norm_reference])
@pytest.mark.parametrize("change, match", [
    ({"residual": jnp.zeros((4, 8))}, r"residual must have x's shape \(4, 16\)"),
    ({"residual": jnp.zeros((4, 16), jnp.bfloat16)}, "residual must have x's dtype"),
    ({"weight": jnp.ones((8,))}, r"weight must be \[hidden\] = \(16,\)"),
])
def test_bad_shapes_name_the_argument(fn, change, match):
    args = {"x": jnp.zeros((4, 16)), "residual": jnp.zeros((4, 16)), "weight": jnp.ones((16,)), **change}
    with pytest.raises(ValueError, match=match):
        fn(args["x"], args["residual"], args["weight"], eps=1e-5)


def test_block_rows_must_be_a_power_of_two():
    x, residual, weight = _inputs((4, 16), jnp.float32)
    with pytest.raises(ValueError, match="block_rows must be a power of two, got 3"):
        fused_add_rms_norm(x, residual, weight, eps=1e-5, interpret=True, block_rows=3)
