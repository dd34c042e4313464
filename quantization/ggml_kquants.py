"""llama.cpp's K-quant super-block formats, 256 weights per block: Q4_K and Q6_K.

Q4_K: 8 sub-blocks of 32 weights, each with its own 6-bit scale and 6-bit minimum (packed into 12
bytes), themselves scaled by the f16 `d` and `dmin`: weight = d * sc * q - dmin * m, q in 0..15
(4.5 bits per weight). Q6_K: 16 sub-blocks of 16 weights with int8 scales times one f16 `d`:
weight = d * sc * (q - 32), q in 0..63, low nibbles in `ql`, top two bits in `qh` (6.5625 bits).

The quantizers port `quantize_row_q4_K_ref` / `quantize_row_q6_K_ref` and their searches
(`make_qkx2_quants`: a weighted least-squares fit of scale and minimum over 21 candidate scales;
`make_qx_quants`: a weighted fit over 19 candidate scales) in f32, sums one term at a time
(`ggml_rounding`), vectorized over sub-blocks. The `gguf` package dequantizes these formats but
does not quantize them (NotImplementedError); libggml does, and the tests hold this port to it.
"""

from __future__ import annotations

import numpy as np

from quantization.ggml_rounding import f32, first_absmax, from_f16, nearest_int, sequential_sum, to_f16_bits

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)

Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (QK_K // 2,))])
Q6_K = np.dtype([("ql", "u1", (QK_K // 2,)), ("qh", "u1", (QK_K // 4,)), ("scales", "i1", (QK_K // 16,)),
                 ("d", "<f2")])


def _weighted_sums(weights, codes, x):
    """(sum w*l, sum w*l*l, sum w*l*x) over the last axis, as the C accumulates them."""
    wl = weights * codes
    return sequential_sum(wl), sequential_sum(wl * codes), sequential_sum(wl * x)


def make_qkx2_quants(x, weights, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Codes 0..nmax, scale and minimum for each row of x f32[..., n] minimizing the weighted squared
    error `sum w * (scale * l + min - x)^2`, searching nstep + 1 candidate scales around
    nmax / (max - min). Returns (scale f32[...], the_min f32[...] (= -min >= 0), codes i32[..., n])."""
    x, weights = f32(x), f32(weights)
    low = np.minimum(x.min(axis=-1), 0)  # the offset: at most 0
    high = x.max(axis=-1)
    flat = high == low
    span = np.where(flat, np.float32(1), high - low)
    sum_w, sum_x = sequential_sum(weights), sequential_sum(weights * x)

    def codes_at(iscale, offset):
        return np.clip(nearest_int(iscale[..., None] * (x - offset[..., None])), 0, nmax)

    def error(scale, offset, codes):
        diff = scale[..., None] * codes + offset[..., None] - x
        return sequential_sum(weights * (diff * diff))

    iscale = np.float32(nmax) / span
    scale = np.float32(1) / iscale
    codes = codes_at(iscale, low)
    best_error = error(scale, low, codes.astype(np.float32))
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):
            candidate = (np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)) / span
            trial = codes_at(candidate, low)
            lf = trial.astype(np.float32)
            sum_l, sum_l2, sum_xl = _weighted_sums(weights, lf, x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0  # the offset must stay <= 0: refit the scale alone
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, np.float32(0), this_min)
            this_error = error(this_scale, this_min, lf)
            better = (det > 0) & (this_error < best_error)
            codes = np.where(better[..., None], trial, codes)
            best_error = np.where(better, this_error, best_error)
            scale, low = np.where(better, this_scale, scale), np.where(better, this_min, low)
            span = np.where(flat, np.float32(1), high - low)  # the C divides by (max - min) with the new min
    codes = np.where(flat[..., None], 0, codes)
    return np.where(flat, np.float32(0), scale), -low, codes


def make_qx_quants(x, nmax: int):
    """Symmetric codes -nmax..nmax-1 (stored + nmax) and a scale for each row of x f32[..., n],
    weighted by x^2 (llama.cpp's rmse_type 1), trying 19 scales around -nmax / max. The sign of the
    scale follows the largest-magnitude weight. Returns (scale f32[...], codes i32[..., n])."""
    x = f32(x)
    biggest = first_absmax(x)
    zero = np.abs(biggest) < GROUP_MAX_EPS
    biggest = np.where(zero, np.float32(1), biggest)
    weights = x * x

    def fit(iscale):
        l = np.clip(nearest_int(iscale[..., None] * x), -nmax, nmax - 1).astype(np.float32)
        return l, sequential_sum(weights * x * l), sequential_sum(weights * l * l)  # C's (w*x)*l, (w*l)*l

    l, sumlx, suml2 = fit(np.float32(-nmax) / biggest)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, np.float32(0))
        best, codes = scale * sumlx, l
        for step in [*range(-9, 0), *range(1, 10)]:
            l, sumlx, suml2 = fit(-(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / biggest)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            codes = np.where(better[..., None], l, codes)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    codes = np.where(zero[..., None], -nmax, codes.astype(np.int32))  # the C stores 0 (= code -nmax)
    return np.where(zero, np.float32(0), scale), codes + nmax


# ---------------------------------------------------------------------------------------------- Q4_K


def _pack_q4k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and minimums of 8 sub-blocks, i32[n, 8] each -> u8[n, 12] (llama.cpp's layout:
    sub-blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7, sub-blocks 4-7 split into nibbles in bytes
    8-11 and their top two bits in the high bits of bytes 0-7)."""
    packed = np.zeros((len(ls), 12), np.int32)
    packed[:, 0:4], packed[:, 4:8] = ls[:, :4], lm[:, :4]
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    packed[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    packed[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return packed.astype(np.uint8)


def _unpack_q4k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """u8[n, 12] -> (scales, minimums) i32[n, 8]: `get_scale_min_k4` for j = 0..7."""
    q = packed.astype(np.int32)
    scales = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    mins = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return scales, mins


def _six_bit(values: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """`MIN(63, (uint8_t)nearest_int(inverse * value))`."""
    return np.minimum(63, nearest_int(inverse[:, None] * values) & 0xFF)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """x f32[n, 256] -> Q4_K blocks [n]."""
    sub = f32(x).reshape(len(x), QK_K // 32, 32)  # f32[n, 8, 32]
    av_x = np.sqrt(sequential_sum(sub * sub) / np.float32(32))
    scales, mins, codes = make_qkx2_quants(sub, av_x[..., None] + np.abs(sub), 15, -1.0, 0.1, 20)
    max_scale = np.maximum(scales.max(axis=1), 0)
    max_min = np.maximum(mins.max(axis=1), 0)
    with np.errstate(divide="ignore"):
        ls = _six_bit(scales, np.where(max_scale > 0, np.float32(63) / max_scale, np.float32(0)))
        lm = _six_bit(mins, np.where(max_min > 0, np.float32(63) / max_min, np.float32(0)))
    blocks = np.zeros(len(x), Q4_K)
    blocks["d"], blocks["dmin"] = to_f16_bits(max_scale / np.float32(63)), to_f16_bits(max_min / np.float32(63))
    blocks["scales"] = _pack_q4k_scales(ls, lm)
    # requantize each sub-block against the 6-bit scale and minimum actually stored
    d = from_f16(blocks["d"])[:, None] * ls.astype(np.float32)  # f32[n, 8]
    dm = from_f16(blocks["dmin"])[:, None] * lm.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requantized = np.clip(nearest_int((sub + dm[..., None]) / d[..., None]), 0, 15)
    codes = np.where((d != 0)[..., None], requantized, codes).reshape(len(x), 4, 2, 32)
    blocks["qs"] = (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(len(x), QK_K // 2)
    return blocks


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    qs = blocks["qs"].astype(np.int32).reshape(len(blocks), 4, 1, 32)
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(len(blocks), 8, 32).astype(np.float32)
    sc, m = _unpack_q4k_scales(blocks["scales"])
    d = from_f16(blocks["d"])[:, None] * sc.astype(np.float32)  # f32[n, 8]
    dm = from_f16(blocks["dmin"])[:, None] * m.astype(np.float32)
    return (d[..., None] * codes - dm[..., None]).reshape(len(blocks), QK_K)


# ---------------------------------------------------------------------------------------------- Q6_K


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """x f32[n, 256] -> Q6_K blocks [n]."""
    sub = f32(x).reshape(len(x), QK_K // 16, 16)  # f32[n, 16, 16]
    scales, codes = make_qx_quants(sub, 32)
    max_scale = first_absmax(scales)
    empty = np.abs(max_scale) < GROUP_MAX_EPS  # the C writes an all-zero block
    iscale = np.float32(-128) / np.where(empty, np.float32(1), max_scale)
    blocks = np.zeros(len(x), Q6_K)
    blocks["d"] = np.where(empty, np.float16(0), to_f16_bits(np.float32(1) / iscale))
    sc = np.where(empty[:, None], 0, np.minimum(127, nearest_int(iscale[:, None] * scales)))
    blocks["scales"] = sc.astype(np.int8)
    d = from_f16(blocks["d"])[:, None] * sc.astype(np.float32)  # f32[n, 16]
    with np.errstate(divide="ignore", invalid="ignore"):
        requantized = np.clip(nearest_int(sub / d[..., None]), -32, 31) + 32
    codes = np.where((d != 0)[..., None], requantized, codes)
    codes = np.where(empty[:, None, None], 0, codes).reshape(len(x), 2, 4, 32)  # [n, half, quarter, l]
    low = codes & 0xF
    blocks["ql"] = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(len(x), QK_K // 2)
    high = codes >> 4
    blocks["qh"] = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4)
                    | (high[:, :, 3] << 6)).reshape(len(x), QK_K // 4)
    return blocks


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    ql = blocks["ql"].astype(np.int32).reshape(len(blocks), 2, 2, 32)  # [n, half, byte row, l]
    qh = blocks["qh"].astype(np.int32).reshape(len(blocks), 2, 1, 32)
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # [n, half, quarter, l]: quarters 0, 1, 2, 3
    high = (qh >> (2 * np.arange(4).reshape(1, 1, 4, 1))) & 3
    codes = ((low | (high << 4)) - 32).reshape(len(blocks), QK_K // 16, 16).astype(np.float32)
    d = from_f16(blocks["d"])[:, None] * blocks["scales"].astype(np.float32)  # f32[n, 16]
    return (d[..., None] * codes).reshape(len(blocks), QK_K)
