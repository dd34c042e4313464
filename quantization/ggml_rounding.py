"""The float habits of llama.cpp's reference quantizers (`ggml-quants.c`), in numpy, so that a port
of them writes the same bytes.

Bit-exactness needs three things the C code does implicitly:
- every operation in f32 (numpy keeps f32 when both operands are f32 arrays or Python scalars);
- sums accumulated left to right, one term at a time (numpy's `sum` is pairwise: different
  rounding), with products formed as the C source groups them (`w*l*x` is `(w*l)*x`); the shipped
  `libggml-base` is built without FMA, so nothing is contracted;
- llama.cpp's three roundings: `nearest_int` (the 1.5 * 2^23 trick: round half to even),
  `roundf` (half away from zero) and C's float -> int cast (toward zero).
"""

from __future__ import annotations

import numpy as np


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def to_f16_bits(x: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: f32 -> IEEE half, round to nearest even (F16C `vcvtps2ph` does the same)."""
    return f32(x).astype(np.float16)


def from_f16(x: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32 (exact)."""
    return np.asarray(x, dtype=np.float16).astype(np.float32)


def nearest_int(x: np.ndarray) -> np.ndarray:
    """llama.cpp's `nearest_int(fval)`: adding 1.5 * 2^23 in f32 rounds to the nearest integer with
    ties to even, which is `rint`; valid for |x| <= 2^22 as the C asserts. -> int32."""
    return np.rint(f32(x)).astype(np.int32)


def roundf(x: np.ndarray) -> np.ndarray:
    """C `roundf`: to the nearest integer, halves away from zero. -> f32."""
    x = f32(x)
    magnitude = np.abs(x)
    whole = np.floor(magnitude)
    # floor(|x| + 0.5) would round 0.49999997 + 0.5 up to 1 in f32; this form is exact
    return np.copysign(whole + np.floor(2 * (magnitude - whole)), x).astype(np.float32)


def sequential_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over the last axis one term at a time, in f32, as a C `for` loop accumulates. [..., n] -> [...]."""
    terms = f32(terms)
    total = terms[..., 0].copy()
    for i in range(1, terms.shape[-1]):
        total += terms[..., i]
    return total


def first_absmax(x: np.ndarray) -> np.ndarray:
    """The first element of largest |value| along the last axis, signed (the C loops' `if (amax < fabsf(v))`
    keeps the first of equal magnitudes). [..., n] -> [...]."""
    index = np.argmax(np.abs(x), axis=-1)
    return np.take_along_axis(x, index[..., None], axis=-1)[..., 0]
