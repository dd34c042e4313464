"""Weight-only integer quantization (FasterTransformer / TensorRT-LLM INT8 weight-only, GPTQ-style
INT4 groups without the error feedback): round each weight to an int8 / int4 code with one scale
per output column (per-channel) or per group of input rows and column.

    symmetric:   scale = absmax / qmax            code = clip(round(w / scale), -qmax - 1, qmax)
    asymmetric:  scale = (hi - lo) / (2^bits - 1)  zero = round(-lo / scale)
                 code = clip(round(w / scale) + zero, 0, 2^bits - 1),  with lo <= 0 <= hi

qmax = 127 (int8) or 7 (int4); asymmetric ranges always hold 0 so a zero weight stays exactly zero.
The common absmax / 127 convention, not qwix's absmax / 127.5 with codes in [-128, 127] (the tests
compare both errors on the same weights). Activations stay in float: the matmul dequantizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from quantization.quantized_tensor import QuantizedTensor, pack_int4


def _grouped(weight: jax.Array, group: int) -> jax.Array:
    """[rows, cols] -> f32[groups, group, cols], the ragged last group padded with zeros (a zero
    never widens a group's range: symmetric ranges are |w| maxima, asymmetric ones hold 0)."""
    rows, cols = weight.shape
    groups = -(-rows // group)
    padded = jnp.pad(weight.astype(jnp.float32), ((0, groups * group - rows), (0, 0)))
    return padded.reshape(groups, group, cols)


def group_scales_zeros(grouped, bits: int, symmetric: bool, xp=jnp):
    """f32[..., group, cols] -> (scales, zeros) f32[..., cols] per the conventions above (zeros None
    when symmetric; integer-valued otherwise). `xp`: jax.numpy or numpy (GPTQ's host-side pass)."""
    if symmetric:
        return xp.abs(grouped).max(axis=-2) / (2 ** (bits - 1) - 1), None
    lo, hi = xp.minimum(grouped.min(axis=-2), 0.0), xp.maximum(grouped.max(axis=-2), 0.0)
    scales = (hi - lo) / (2 ** bits - 1)
    return scales, xp.round(-lo / xp.where(scales > 0, scales, 1.0))


def round_to_codes(w, scales, zeros, bits: int, xp=jnp):
    """w [..., cols] with the scales (and zeros) broadcast against it -> integer codes (float-valued)."""
    safe = xp.where(scales > 0, scales, 1.0)
    if zeros is None:
        qmax = 2 ** (bits - 1) - 1
        return xp.clip(xp.round(w / safe), -qmax - 1, qmax)
    return xp.clip(xp.round(w / safe) + zeros, 0, 2 ** bits - 1)


def quantize_weight(weight: jax.Array, bits: int, group_size: int = 0, symmetric: bool = True,
                    scale_dtype=jnp.float32) -> QuantizedTensor:
    """weight [rows, cols] -> QuantizedTensor with `bits`-bit codes, one scale per `group_size` rows
    (0: all rows, i.e. per output channel) and column."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    rows, cols = weight.shape
    group = group_size or rows
    grouped = _grouped(weight, group)  # f32[groups, group, cols]
    scales, zeros = group_scales_zeros(grouped, bits, symmetric)  # f32[groups, cols]
    codes = round_to_codes(grouped, scales[:, None], None if zeros is None else zeros[:, None], bits)
    return tensor_from_codes(codes.reshape(-1, cols)[:rows], scales, zeros, bits, group_size, scale_dtype)


def tensor_from_codes(codes, scales, zeros, bits: int, group_size: int, scale_dtype) -> QuantizedTensor:
    """Integer-valued codes [rows, cols] (signed when `zeros` is None) and their per-group scales
    (and zeros) -> the QuantizedTensor: int8 / uint8 codes, or int4 packed two per byte."""
    rows = codes.shape[0]
    codes = jnp.asarray(codes).astype(jnp.int32)
    values = pack_int4(codes) if bits == 4 else codes.astype(jnp.int8 if zeros is None else jnp.uint8)
    return QuantizedTensor(values, jnp.asarray(scales, scale_dtype),
                           None if zeros is None else jnp.asarray(zeros, scale_dtype),
                           group_size=group_size if group_size < rows else 0, bits=bits,
                           rows=rows if bits == 4 and rows % 2 else 0)
