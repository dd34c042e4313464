"""The quantized-weight leaf that the model's `linear` and `embed` ops accept in place of an array.

    QuantizedTensor(values, scales, zeros=None, group_size=rows)
    dequantize()  ->  (values - zeros) * scales, one scale (and zero) per group of `group_size` rows

A weight `[rows, cols]` (`[in, out]` for a projection, `[vocab, hidden]` for an embedding table) is
stored as integer codes `values` plus per-group, per-column `scales` (and, for asymmetric schemes,
`zeros`): groups run along the rows, so `group_size == rows` is per-output-channel quantization and
`group_size == 32` is llama.cpp's block size. It is a JAX pytree (codes and scales are leaves,
`group_size` is static), so a params tree holding it passes through `jax.jit` unchanged and
quantizing a model is a tree map over its params: the model code never changes. The quantization
schemes that produce it come with the quantization issue; this module is the contract.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    values: jax.Array  # int8/uint8[rows, cols] integer codes
    scales: jax.Array  # f32/f16/bf16[rows // group_size, cols]
    zeros: jax.Array | None = None  # like scales, in code units (None: symmetric, zero point 0)
    group_size: int = dataclasses.field(default=0, metadata=dict(static=True))  # 0: all rows

    def __post_init__(self) -> None:
        if not all(hasattr(a, "shape") for a in (self.values, self.scales)):
            return  # jax rebuilding the tree with placeholder leaves (e.g. vmap axes)
        rows, cols = self.values.shape
        group = self.group_size or rows
        if rows % group:
            raise ValueError(f"QuantizedTensor.group_size must divide the {rows} rows, got {group}")
        if tuple(self.scales.shape) != (rows // group, cols):
            raise ValueError(f"QuantizedTensor.scales must have shape {(rows // group, cols)} "
                             f"(groups of {group} rows x {cols} columns), got {tuple(self.scales.shape)}")
        if self.zeros is not None and tuple(self.zeros.shape) != tuple(self.scales.shape):
            raise ValueError(f"QuantizedTensor.zeros must match scales' shape {tuple(self.scales.shape)}, "
                             f"got {tuple(self.zeros.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    @property
    def dtype(self):
        """The dtype the weight dequantizes to (the scales')."""
        return self.scales.dtype

    def _groups(self) -> int:
        return self.group_size or self.values.shape[0]

    def dequantize(self, dtype=None) -> jax.Array:
        """The weight as a dense array [rows, cols] in `dtype` (default: the scales' dtype)."""
        dtype = dtype or self.scales.dtype
        codes = self.values.astype(jnp.float32)
        scales = jnp.repeat(self.scales.astype(jnp.float32), self._groups(), axis=0)  # f32[rows, cols]
        if self.zeros is not None:
            codes = codes - jnp.repeat(self.zeros.astype(jnp.float32), self._groups(), axis=0)
        return (codes * scales).astype(dtype)

    def take_rows(self, indices: jax.Array, dtype=None) -> jax.Array:
        """Rows `indices` (any shape) dequantized: an embedding lookup. f[*indices.shape, cols]."""
        dtype = dtype or self.scales.dtype
        group_index = indices // self._groups()
        codes = self.values[indices].astype(jnp.float32)
        if self.zeros is not None:
            codes = codes - self.zeros[group_index].astype(jnp.float32)
        return (codes * self.scales[group_index].astype(jnp.float32)).astype(dtype)
