"""Small-batch `x @ W` for a QuantizedTensor as a multiply-reduce that XLA CPU fuses with the
dequantization, so a decode step reads the quantized bytes and never writes an f32 copy of W. An
experiment in how XLA CPU compiles quantized matmuls, not a fast path: measured slower than the dot
over the dequantized weight (`python -m experiments.matvec_chain --quantized`), so the ops sets do
not use it.

    y = reduce_matmul(x, weight)      # x [..., rows] (a few tokens), weight a QuantizedTensor [rows, cols]

Written as `dot(x, dequantize(W))`, XLA CPU compiles the int-to-float convert as a loop of its own
that writes the whole f32 weight, then the dot reads it back: at batch 1, 5x the bytes of the f32
weight itself for an int8 one. Written as a broadcast multiply and a sum over the rows, the
convert, the nibble unpacking and the multiply fuse into the reduction (one fusion reading the
codes), which is what a bandwidth-bound matvec wants. Per group of rows:

    y[t, o] = sum_g scale[g, o] * (sum_{k in g} x[t, k] * code[k, o])  -  sum_g scale[g, o] zero[g, o] xsum[t, g]
            (+ sum_g min[g, o] xsum[t, g] with minimums),   xsum[t, g] = sum_{k in g} x[t, k]

so codes are multiplied as they are and the scales apply once per group. The compiled program
holds int8 codes inside one fusion (int4 codes are unpacked to an int8 copy first: XLA fuses an
int8 convert into the reduction, not the bit operations), as the tests check in the optimized HLO;
but XLA CPU's reduction over [tokens, rows, cols] runs far below the dot's speed. Ragged groups are
padded with zero activations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from quantization.quantized_tensor import QuantizedTensor, sign_extend_nibbles

MAX_TOKENS = 4  # a batch-1 decode step pads to 4 rows (the runner's smallest decode bucket)


def supported(weight: QuantizedTensor) -> bool:
    """Whether the formulation applies: integer codes (XLA CPU does not fuse an FP8 convert into the
    reduction) in groups of an even number of rows when packed as int4."""
    return not weight.is_float8 and (weight.bits == 8 or (weight.group_size or weight.shape[0]) % 2 == 0)


def _planes(x: jax.Array, weight: QuantizedTensor, groups: int, group: int):
    """[(x part f32[tokens, groups, n], codes f32[groups, n, cols])]: one pair for int8 (n = group);
    for int4 the even rows with the low nibbles and the odd rows with the high ones (n = group / 2),
    so the codes are never interleaved (an interleave is a copy XLA will not fuse). Zero-padded to
    whole groups."""
    rows, cols = weight.shape
    tokens = jnp.pad(x.reshape(-1, rows).astype(jnp.float32), ((0, 0), (0, groups * group - rows)))
    if weight.bits == 8:
        codes = jnp.pad(weight.values.astype(jnp.float32), ((0, groups * group - rows), (0, 0)))
        return [(tokens.reshape(-1, groups, group), codes.reshape(groups, group, cols))]
    half = group // 2
    packed = jnp.pad(weight.values, ((0, groups * half - weight.values.shape[0]), (0, 0))).astype(jnp.int32)
    planes = []
    for shift, x_rows in ((0, tokens[:, 0::2]), (4, tokens[:, 1::2])):
        nibbles = (packed >> shift) & 0xF
        codes = (sign_extend_nibbles(nibbles) if weight.signed else nibbles).astype(jnp.int8)
        # unpacked to int8 first: XLA CPU fuses an int8 convert into the reduction, not the bit ops
        codes = jax.lax.optimization_barrier(codes).astype(jnp.float32)
        planes.append((x_rows.reshape(-1, groups, half), codes.reshape(groups, half, cols)))
    return planes


def reduce_matmul(x: jax.Array, weight: QuantizedTensor) -> jax.Array:
    """x [..., rows] @ weight -> [..., cols] in x's dtype, accumulated in f32 (see the module docstring)."""
    rows, cols = weight.shape
    if x.shape[-1] != rows:
        raise ValueError(f"x must be [..., rows] for a weight of shape {weight.shape}; got x {x.shape}")
    if not supported(weight):
        raise ValueError("reduce_matmul takes integer codes, int4 in groups of an even number of rows")
    group = weight.group_size or rows
    groups = -(-rows // group)
    planes = _planes(x, weight, groups, group)
    # f32[tokens, groups, cols]: each group's codes times its activations, summed over the group's rows
    partial = sum((xg[..., None] * codes[None]).sum(axis=2) for xg, codes in planes)
    scales = weight.scales.astype(jnp.float32)  # f32[groups, cols]
    y = (partial * scales[None]).sum(axis=1)  # f32[tokens, cols]
    if weight.zeros is not None or weight.mins is not None:
        xsum = sum(xg.sum(axis=2) for xg, _ in planes)  # f32[tokens, groups]
        offset = (-weight.zeros.astype(jnp.float32) * scales if weight.zeros is not None
                  else weight.mins.astype(jnp.float32))  # f32[groups, cols], weight units
        y = y + xsum @ offset
    return y.reshape(*x.shape[:-1], cols).astype(x.dtype)
