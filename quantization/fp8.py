"""FP8 E4M3 weights (TensorRT-LLM's and vLLM's `fp8`): each weight stored as one float8_e4m3fn
value (4 exponent bits, 3 mantissa bits, largest finite 448, no infinities) times a float scale.

    weight = quantize_fp8(w)                      # one scale per output column (per-channel)
    weight = quantize_fp8(w, per_channel=False)   # one scale for the whole tensor (per-tensor)

scale = absmax / 448, so the largest |w| lands on E4M3's largest finite value and the cast rounds
the rest to nearest-even. Unlike int8's uniform grid, E4M3 keeps 3 mantissa bits at every
magnitude: small weights keep their relative precision and large ones lose absolute precision.
Per-tensor is the usual checkpoint format (one scale per tensor); per-channel tracks columns of
very different size. The result is a `QuantizedTensor` (`bits=8`, FP8 codes): the model's `linear`
and the dequant-matmul kernel read it like the integer schemes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from quantization.quantized_tensor import QuantizedTensor

E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448


def quantize_fp8(weight: jax.Array, per_channel: bool = True, scale_dtype=jnp.float32) -> QuantizedTensor:
    """weight [rows, cols] -> QuantizedTensor of float8_e4m3fn values with one scale per column
    (`per_channel`) or one for the tensor (stored per column, all equal)."""
    w = weight.astype(jnp.float32)
    absmax = jnp.abs(w).max(axis=0, keepdims=True)  # f32[1, cols]
    if not per_channel:
        absmax = jnp.broadcast_to(absmax.max(), absmax.shape)
    scales = absmax / E4M3_MAX
    values = (w / jnp.where(scales > 0, scales, 1.0)).astype(jnp.float8_e4m3fn)  # f8[rows, cols]
    return QuantizedTensor(values, scales.astype(scale_dtype))
