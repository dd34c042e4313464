"""W8A8: int8 weights times int8 activations, accumulated in int32 (SmoothQuant, TensorRT-LLM's INT8
SmoothQuant mode, FasterTransformer's INT8 GEMMs).

    y = (round(x / s / a) . Wq) * a * w_scale,   Wq = round(W * s / w_scale) in int8

- weights: int8, one scale per output channel (`w_scale = max_in |W * s| / 127`);
- activations: int8 with one scale `a` per token, computed on the fly (`max |x / s| / 127`), or one
  static per-tensor scale fixed from calibration (the variant that collapses when a few channels
  carry outliers: one scale must cover them, so every other channel keeps only a few levels);
- smoothing (SmoothQuant): per input channel, `s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)` from
  calibration activations moves the activations' outliers into the weights, which quantize per
  output channel and absorb them. The division by `s` is an elementwise multiply XLA fuses into the
  activation quantization (SmoothQuant folds it into the preceding norm instead; same numbers).
The matmul is a real `s8 x s8 -> s32` dot: XLA CPU compiles it as one, so W8A8 is the int8 scheme
that can be *faster* than f32 here, not only smaller.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class W8A8Tensor:
    values: jax.Array  # int8[in, out]: the smoothed weight's codes
    scales: jax.Array  # f32[out]: per output channel
    smooth: jax.Array | None = None  # f32[in]: activations are divided by it (None: no smoothing)
    act_scale: jax.Array | None = None  # f32[]: static per-tensor activation scale (None: per token, dynamic)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    @property
    def dtype(self):
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (self.values, self.scales, self.smooth, self.act_scale)
                   if a is not None)

    def dequantize(self, dtype=None) -> jax.Array:
        """The weight as a dense array [in, out] (the smoothing undone)."""
        weight = self.values.astype(jnp.float32) * self.scales.astype(jnp.float32)
        if self.smooth is not None:
            weight = weight / self.smooth[:, None]
        return weight.astype(dtype or self.scales.dtype)

    def matmul(self, x: jax.Array, pad_single_row: bool = True) -> jax.Array:
        """x [..., in] -> [..., out] in x's dtype, through an int8 x int8 -> int32 dot (`int8_dot`;
        pad_single_row False only to time what XLA CPU does with one row)."""
        xq, act = quantize_activations(x, self.smooth, self.act_scale)
        acc = int8_dot(xq, self.values, pad_single_row)  # i32[..., out]
        return (acc.astype(jnp.float32) * act * self.scales.astype(jnp.float32)).astype(x.dtype)


def quantize_activations(x: jax.Array, smooth: jax.Array | None,
                         act_scale: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """x [..., in] -> (codes s8[..., in], scale f32[..., 1] or f32[]): x divided by the smoothing
    factors, then by one scale per token (`max |x / s| / 127`, dynamic) or the static per-tensor
    `act_scale`; an all-zero token keeps scale 1."""
    xs = x.astype(jnp.float32)
    if smooth is not None:
        xs = xs / smooth
    act = jnp.max(jnp.abs(xs), axis=-1, keepdims=True) / 127.0 if act_scale is None else act_scale
    act = jnp.where(act > 0, act, 1.0)
    return jnp.clip(jnp.round(xs / act), -127, 127).astype(jnp.int8), act


def int8_dot(xq: jax.Array, values: jax.Array, pad_single_row: bool = True) -> jax.Array:
    """xq s8[..., in] . values s8[in, out] -> s32[..., out]. A single row is padded to two: XLA CPU
    runs a one-row s8 dot ~8x slower than the padded one (SmolLM2's 210 projections in a chain:
    `python -m experiments.matvec_chain --quantized --batch 1`)."""
    lead = xq.shape[:-1]
    rows = xq.reshape(-1, xq.shape[-1])  # s8[tokens, in]
    if rows.shape[0] == 1 and pad_single_row:
        rows = jnp.pad(rows, ((0, 1), (0, 0)))
    acc = lax.dot_general(rows, values, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return acc[:math.prod(lead)].reshape(*lead, values.shape[1])


def smoothing_factors(act_absmax: jax.Array, weight: jax.Array, alpha: float) -> jax.Array:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) over input channels j. f32[in]."""
    weight_absmax = jnp.max(jnp.abs(weight.astype(jnp.float32)), axis=1)
    s = jnp.power(jnp.maximum(act_absmax, 1e-5), alpha) / jnp.power(jnp.maximum(weight_absmax, 1e-5), 1 - alpha)
    return jnp.maximum(s, 1e-5)


def quantize_w8a8(weight: jax.Array, act_absmax: jax.Array | None = None, *, smooth_alpha: float | None = None,
                  per_tensor: bool = False) -> W8A8Tensor:
    """weight [in, out] -> W8A8Tensor. `act_absmax` f32[in]: calibration max |x| per input channel
    (needed for smoothing and for a static per-tensor activation scale)."""
    if (smooth_alpha is not None or per_tensor) and act_absmax is None:
        raise ValueError("smoothing and a per-tensor activation scale need calibration activations (act_absmax)")
    weight = weight.astype(jnp.float32)
    smooth = None if smooth_alpha is None else smoothing_factors(act_absmax, weight, smooth_alpha)
    smoothed = weight if smooth is None else weight * smooth[:, None]
    scales = jnp.max(jnp.abs(smoothed), axis=0) / 127.0  # f32[out]
    values = jnp.clip(jnp.round(smoothed / jnp.where(scales > 0, scales, 1.0)), -127, 127).astype(jnp.int8)
    act_scale = None
    if per_tensor:
        act_scale = jnp.max(act_absmax if smooth is None else act_absmax / smooth) / 127.0
    return W8A8Tensor(values, scales, smooth, act_scale)
