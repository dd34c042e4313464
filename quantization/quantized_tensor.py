"""The quantized-weight leaf that the model's `linear` and `embed` ops accept in place of an array.

    QuantizedTensor(values, scales, zeros=None, group_size=rows, bits=8, mins=None)
    dequantize()  ->  (codes - zeros) * scales     one scale (and zero) per group of `group_size` rows
                      codes * scales + mins        with `mins` instead (llama.cpp's Q4_1 `d * q + m`)

A weight `[rows, cols]` (`[in, out]` for a projection, `[vocab, hidden]` for an embedding table) is
stored as integer codes plus per-group, per-column `scales`, and for asymmetric schemes either
`zeros` (in code units, the GPTQ / AWQ convention) or `mins` (in weight units, llama.cpp's). Groups
run along the rows, so `group_size == rows` is per-output-channel quantization and `group_size ==
32` is llama.cpp's block size. The last group may be shorter (SmolLM2's 576 rows in groups of 128:
four full groups and one of 64). `bits=8`: `values` holds one int8 (symmetric) / uint8
(asymmetric) code per weight, or one FP8 E4M3 value (float8_e4m3fn, `quantization/fp8.py`);
`bits=4`: two codes per byte, `values` u8[ceil(rows / 2), cols], row 2i in the low nibble and row
2i + 1 in the high one (signed codes -8..7 two's-complement in the nibble when symmetric, 0..15
when asymmetric); an odd row count leaves the last high nibble unused and is recorded in `rows`.

It is a JAX pytree (codes, scales, zeros and mins are leaves; `group_size` and `bits` are static), so a
params tree holding it passes through `jax.jit` unchanged and quantizing a model is a tree map over
its params (`quantization.quantize_params`): the model code never changes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def pack_int4(codes: jax.Array) -> jax.Array:
    """int codes [rows, cols] (-8..7 or 0..15) -> u8[ceil(rows / 2), cols], two per byte."""
    nibbles = codes.astype(jnp.int32) & 0xF
    if codes.shape[0] % 2:
        nibbles = jnp.pad(nibbles, ((0, 1), (0, 0)))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(jnp.uint8)


def sign_extend_nibbles(nibbles: jax.Array) -> jax.Array:
    """4-bit two's-complement nibbles (i32, 0..15) -> their signed values -8..7."""
    return (nibbles ^ 8) - 8


def unpack_int4(packed: jax.Array, signed: bool) -> jax.Array:
    """u8[ceil(rows / 2), cols] -> i32[2 * ceil(rows / 2), cols], the inverse of `pack_int4` (an odd
    row count's padding row included)."""
    packed = packed.astype(jnp.int32)
    nibbles = jnp.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1, packed.shape[1])
    return sign_extend_nibbles(nibbles) if signed else nibbles


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    values: jax.Array  # int8/uint8[rows, cols] codes, or u8[ceil(rows / 2), cols] when bits == 4
    scales: jax.Array  # f32/f16/bf16[ceil(rows / group_size), cols]
    zeros: jax.Array | None = None  # like scales, in code units (None: symmetric, zero point 0)
    group_size: int = dataclasses.field(default=0, metadata=dict(static=True))  # 0: all rows
    bits: int = dataclasses.field(default=8, metadata=dict(static=True))  # 8, or 4 (packed)
    rows: int = dataclasses.field(default=0, metadata=dict(static=True))  # bits 4: the row count (0: even, 2 x packed)
    mins: jax.Array | None = None  # like scales, in weight units, added (excludes zeros)

    def __post_init__(self) -> None:
        if not all(hasattr(a, "shape") for a in (self.values, self.scales)):
            return  # jax rebuilding the tree with placeholder leaves (e.g. vmap axes)
        if self.bits not in (4, 8):
            raise ValueError(f"QuantizedTensor.bits must be 4 or 8, got {self.bits}")
        rows, cols = self.shape
        group = self.group_size or rows
        groups = -(-rows // group)
        if tuple(self.scales.shape) != (groups, cols):
            raise ValueError(f"QuantizedTensor.scales must have shape {(groups, cols)} "
                             f"(groups of {group} rows x {cols} columns), got {tuple(self.scales.shape)}")
        for field in ("zeros", "mins"):
            offset = getattr(self, field)
            if offset is not None and tuple(offset.shape) != tuple(self.scales.shape):
                raise ValueError(f"QuantizedTensor.{field} must match scales' shape {tuple(self.scales.shape)}, "
                                 f"got {tuple(offset.shape)}")
        if self.zeros is not None and self.mins is not None:
            raise ValueError("QuantizedTensor takes zeros (code units) or mins (weight units), not both")

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.values.shape
        return (self.rows or rows * 8 // self.bits, cols)

    @property
    def dtype(self):
        """The dtype the weight dequantizes to (the scales')."""
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales and zeros."""
        return sum(a.size * a.dtype.itemsize for a in (self.values, self.scales, self.zeros, self.mins)
                   if a is not None)

    @property
    def signed(self) -> bool:
        """Whether the codes are signed (symmetric: no zeros and no mins)."""
        return self.zeros is None and self.mins is None

    def _group(self) -> int:
        return self.group_size or self.shape[0]

    @property
    def is_float8(self) -> bool:
        """Whether the codes are FP8 values (`quantization/fp8.py`) rather than integers."""
        return jnp.issubdtype(self.values.dtype, jnp.floating)

    def codes(self) -> jax.Array:
        """The codes, one per weight: i32[rows, cols] (f32 for FP8 codes)."""
        if self.bits == 4:
            return unpack_int4(self.values, signed=self.signed)[:self.shape[0]]
        return self.values.astype(jnp.float32 if self.is_float8 else jnp.int32)

    def _per_row(self, per_group: jax.Array, rows: int) -> jax.Array:
        """f32[groups, cols] -> f32[rows, cols], each group's row repeated over its rows."""
        return jnp.repeat(per_group.astype(jnp.float32), self._group(), axis=0)[:rows]

    def dequantize(self, dtype=None) -> jax.Array:
        """The weight as a dense array [rows, cols] in `dtype` (default: the scales' dtype)."""
        dtype = dtype or self.scales.dtype
        rows = self.shape[0]
        codes = self.codes().astype(jnp.float32)
        if self.zeros is not None:
            codes = codes - self._per_row(self.zeros, rows)
        weight = codes * self._per_row(self.scales, rows)
        if self.mins is not None:
            weight = weight + self._per_row(self.mins, rows)
        return weight.astype(dtype)

    def take_rows(self, indices: jax.Array, dtype=None) -> jax.Array:
        """Rows `indices` (any shape) dequantized: an embedding lookup. f[*indices.shape, cols]."""
        dtype = dtype or self.scales.dtype
        group_index = indices // self._group()
        if self.bits == 4:
            nibbles = (self.values[indices // 2].astype(jnp.int32) >> (4 * (indices % 2))[..., None]) & 0xF
            codes = sign_extend_nibbles(nibbles) if self.signed else nibbles
        else:
            codes = self.values[indices]
        codes = codes.astype(jnp.float32)
        if self.zeros is not None:
            codes = codes - self.zeros[group_index].astype(jnp.float32)
        weight = codes * self.scales[group_index].astype(jnp.float32)
        if self.mins is not None:
            weight = weight + self.mins[group_index].astype(jnp.float32)
        return weight.astype(dtype)
