"""llama.cpp's original block formats, 32 weights per block: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each block stores an f16 scale `d` (and, for the `_1` formats, an f16 minimum `m`) and one small
integer code per weight; a weight is `d * (q - offset)` (`_0`: symmetric, offset 8 / 16) or
`d * q + m` (`_1`: asymmetric). Q5 keeps the low four bits of each code in nibbles and the fifth
bits of all 32 in one little-endian u32 `qh`. The layouts are llama.cpp's `block_q4_0` ... structs,
as numpy structured dtypes (no padding), so a block array viewed as bytes is the GGUF tensor data.

The quantizers port `quantize_row_q*_ref` (the reference llama.cpp writes model files with) step
by step in f32 (see `ggml_rounding`); vectorized over blocks. x: f32[num_blocks, 32].
"""

from __future__ import annotations

import numpy as np

from quantization.ggml_rounding import f32, first_absmax, from_f16, roundf, to_f16_bits

BLOCK = 32
HALF = BLOCK // 2

Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (HALF,))])
Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (HALF,))])
Q5_0 = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", (HALF,))])
Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", (HALF,))])
Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (BLOCK,))])


def _inverse(d: np.ndarray) -> np.ndarray:
    """`d ? 1.0f/d : 0.0f`, f32."""
    return np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """codes [n, 32] (0..15 in their low bits) -> u8[n, 16]: weight j in the low nibble of byte j,
    weight j + 16 in its high nibble."""
    return ((codes[:, :HALF] & 0xF) | ((codes[:, HALF:] & 0xF) << 4)).astype(np.uint8)


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """u8[n, 16] -> i32[n, 32], the inverse of `_pack_nibbles`."""
    qs = qs.astype(np.int32)
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _pack_fifth_bits(codes: np.ndarray) -> np.ndarray:
    """codes [n, 32] (0..31) -> u32[n]: bit j is bit 4 of weight j."""
    bits = ((codes >> 4) & 1).astype(np.uint32)
    return (bits << np.arange(BLOCK, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


def _unpack_fifth_bits(qh: np.ndarray) -> np.ndarray:
    """u32[n] -> i32[n, 32]: 16 where the weight's fifth bit is set."""
    return (((qh[:, None] >> np.arange(BLOCK, dtype=np.uint32)) & 1) << 4).astype(np.int32)


def _scaled_codes(x, id_, offset: float, top: int | None) -> np.ndarray:
    """C's `MIN(top, (int8_t)(x * id + offset))`: truncation toward zero, after an f32 add."""
    codes = (f32(x) * id_[:, None] + np.float32(offset)).astype(np.int32)
    return codes if top is None else np.minimum(top, codes)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    d = first_absmax(x) / np.float32(-8)  # the extreme weight maps to code 0 exactly
    blocks = np.zeros(len(x), Q4_0)
    blocks["d"] = to_f16_bits(d)
    blocks["qs"] = _pack_nibbles(_scaled_codes(x, _inverse(d), 8.5, 15))
    return blocks


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    return (unpack_nibbles(blocks["qs"]) - 8).astype(np.float32) * from_f16(blocks["d"])[:, None]


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    low, high = x.min(axis=1), x.max(axis=1)
    d = (high - low) / np.float32(15)
    blocks = np.zeros(len(x), Q4_1)
    blocks["d"], blocks["m"] = to_f16_bits(d), to_f16_bits(low)
    blocks["qs"] = _pack_nibbles(_scaled_codes(x - low[:, None], _inverse(d), 0.5, 15))
    return blocks


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    codes = unpack_nibbles(blocks["qs"]).astype(np.float32)
    return codes * from_f16(blocks["d"])[:, None] + from_f16(blocks["m"])[:, None]


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    d = first_absmax(x) / np.float32(-16)
    codes = _scaled_codes(x, _inverse(d), 16.5, 31)
    blocks = np.zeros(len(x), Q5_0)
    blocks["d"], blocks["qh"], blocks["qs"] = to_f16_bits(d), _pack_fifth_bits(codes), _pack_nibbles(codes)
    return blocks


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    codes = unpack_nibbles(blocks["qs"]) | _unpack_fifth_bits(blocks["qh"])
    return (codes - 16).astype(np.float32) * from_f16(blocks["d"])[:, None]


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    low, high = x.min(axis=1), x.max(axis=1)
    d = (high - low) / np.float32(31)
    codes = _scaled_codes(x - low[:, None], _inverse(d), 0.5, None)  # the C has no clamp here
    blocks = np.zeros(len(x), Q5_1)
    blocks["d"], blocks["m"] = to_f16_bits(d), to_f16_bits(low)
    blocks["qh"], blocks["qs"] = _pack_fifth_bits(codes), _pack_nibbles(codes)
    return blocks


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    codes = (unpack_nibbles(blocks["qs"]) | _unpack_fifth_bits(blocks["qh"])).astype(np.float32)
    return codes * from_f16(blocks["d"])[:, None] + from_f16(blocks["m"])[:, None]


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1) / np.float32(127)
    blocks = np.zeros(len(x), Q8_0)
    blocks["d"] = to_f16_bits(d)
    blocks["qs"] = roundf(f32(x) * _inverse(d)[:, None]).astype(np.int8)
    return blocks


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    return blocks["qs"].astype(np.float32) * from_f16(blocks["d"])[:, None]
