"""Dequant-matmul: `x @ W` for a quantized weight W, dequantized one tile at a time inside the kernel
(the GPU weight-only GEMM of FasterTransformer / TensorRT-LLM, the GPTQ / AWQ / llama.cpp CUDA
kernels), so the weight is never written out whole in float.

    y = dequant_matmul(x, weight)            # x [..., rows], weight a QuantizedTensor [rows, cols]
    y = dequant_matmul_reference(x, weight)  # x @ weight.dequantize(): the same numbers, materialized

At decode a projection is a read of its weight: read as int8 it is 4x fewer bytes than f32, as int4
8x fewer (plus one scale per group), and a kernel that widens each tile in registers keeps that
ratio. Every `QuantizedTensor` layout runs here: int8 / int4 / FP8 codes, symmetric, `zeros` (GPTQ
/ AWQ) or `mins` (llama.cpp's Q4_1 `d * q + m`; Q4_0 and Q8_0 are symmetric codes, see
`quantization/ggml_tensor.py`), groups of 32 / 64 / 128 rows or one per column.

Kernel design (Triton-lowered Pallas, tested in interpret mode on CPU): grid `(cdiv(tokens,
block_rows), cols // block_cols)`; a program owns `block_rows` rows of x and `block_cols` output
columns and walks the weight's rows in chunks of `block_k`, a power of two that divides the group,
so each chunk has one scale (and zero / min) row: it loads the chunk's codes, widens them to f32,
applies that row and accumulates one `dot` in f32. int4 codes are unpacked without interleaving:
byte row i holds weight rows 2i (low nibble) and 2i + 1 (high nibble), so the wrapper splits x's
columns into even and odd ones instead (a copy of the small activation, never of the weight) and
the kernel does one `dot` per nibble plane. Triton's `dot` needs every dimension >= 16, so rows are
zero-padded to `block_rows` (>= 16) and a chunk is >= 16 byte rows; groups must divide the rows
(a ragged last group, e.g. 576 rows in groups of 128, is refused with a clear error: the `xla`
path runs it). Triton rather than Mosaic GPU for the reasons given in `kernel_fusion/rms_norm.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from quantization.quantized_tensor import QuantizedTensor, sign_extend_nibbles

MIN_DOT = 16  # Triton's smallest dot dimension


def largest_pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap (a power of two) that divides n (`n & -n`: n's lowest set bit)."""
    return min(cap, n & -n)


def _check_inputs(x: jax.Array, weight: QuantizedTensor) -> None:
    if not isinstance(weight, QuantizedTensor):
        raise TypeError(f"weight must be a QuantizedTensor, got {type(weight).__name__}")
    if x.ndim < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"x must be [..., rows] for a weight of shape {weight.shape}; got x {x.shape}")


def tiling_problem(weight: QuantizedTensor) -> str | None:
    """Why the kernel cannot tile `weight` (None: it can): groups must divide the rows, a group must
    give chunks of >= 16 byte rows and cols must divide into >= 16-column tiles (Triton's dot)."""
    rows, cols = weight.shape
    group = weight.group_size or rows
    if rows % group or rows % 2 and weight.bits == 4:
        return (f"dequant_matmul needs groups that divide the rows: {rows} rows in groups of {group} leave a "
                f"ragged last group (use a group size dividing {rows}, or the xla ops)")
    per_byte = 8 // weight.bits
    if largest_pow2_divisor(group, 64 * per_byte) < MIN_DOT * per_byte or largest_pow2_divisor(cols, 128) < MIN_DOT:
        return (f"dequant_matmul needs a group ({group}) divisible by {MIN_DOT * per_byte} and cols ({cols}) "
                f"divisible by {MIN_DOT} (Triton's dot); got weight {weight.shape}")
    return None


def kernel_chunk(weight: QuantizedTensor) -> int:
    """The rows one kernel step reads (`block_k`): the largest power of two up to 64 byte rows that
    divides the group, so a chunk never straddles two groups."""
    problem = tiling_problem(weight)
    if problem:
        raise ValueError(problem)
    return largest_pow2_divisor(weight.group_size or weight.shape[0], 64 * 8 // weight.bits)


def _kernel(*refs, block_k: int, group: int, bits: int, signed: bool, offset: str | None, float8: bool):
    """refs: the x planes (x, or its even and odd columns for int4), codes, scales, [zeros | mins], out."""
    planes = refs[:2] if bits == 4 else refs[:1]
    codes_ref, scales_ref = refs[len(planes)], refs[len(planes) + 1]
    offset_ref = refs[len(planes) + 2] if offset else None
    out_ref = refs[-1]
    chunk_rows = block_k * bits // 8  # byte rows per step
    num_chunks = codes_ref.shape[0] // chunk_rows

    def body(k, acc):
        group_row = pl.ds(k * block_k // group, 1)
        scale = scales_ref[group_row, :].astype(jnp.float32)  # f32[1, block_cols]
        packed = codes_ref[pl.ds(k * chunk_rows, chunk_rows), :]  # [chunk_rows, block_cols]
        packed = packed.astype(jnp.float32 if float8 else jnp.int32)
        for plane, x_ref in enumerate(planes):
            codes = (packed >> (4 * plane)) & 0xF if bits == 4 else packed
            if bits == 4 and signed:
                codes = sign_extend_nibbles(codes)
            w = codes.astype(jnp.float32)
            if offset == "zeros":
                w = (w - offset_ref[group_row, :].astype(jnp.float32)) * scale
            elif offset == "mins":
                w = w * scale + offset_ref[group_row, :].astype(jnp.float32)
            else:
                w = w * scale
            x = x_ref[:, pl.ds(k * chunk_rows, chunk_rows)].astype(jnp.float32)  # f32[block_rows, chunk_rows]
            acc += pltriton.dot(x, w)
        return acc

    acc = jax.lax.fori_loop(0, num_chunks, body, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_rows", "num_warps", "num_stages"))
def dequant_matmul(x: jax.Array, weight: QuantizedTensor, *, interpret: bool = False, block_rows: int = 16,
                   num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """x [..., rows] @ weight (QuantizedTensor [rows, cols]) -> [..., cols] in x's dtype, accumulated
    in f32, the weight widened a tile at a time. block_rows: a power of two >= 16."""
    _check_inputs(x, weight)
    if block_rows < MIN_DOT or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two >= 16 (Triton's dot), got {block_rows}")
    block_k = kernel_chunk(weight)
    rows, cols = weight.shape
    block_cols = largest_pow2_divisor(cols, 128)
    lead = x.shape[:-1]
    tokens = x.reshape(-1, rows)  # [num_tokens, rows]
    num_tokens = tokens.shape[0]
    padded = pl.cdiv(max(num_tokens, 1), block_rows) * block_rows
    tokens = jnp.pad(tokens, ((0, padded - num_tokens), (0, 0)))
    planes = [tokens[:, 0::2], tokens[:, 1::2]] if weight.bits == 4 else [tokens]
    offset = "zeros" if weight.zeros is not None else "mins" if weight.mins is not None else None
    operands = [*planes, weight.values, weight.scales] + ([getattr(weight, offset)] if offset else [])
    groups = weight.scales.shape[0]
    plane_spec = pl.BlockSpec((block_rows, planes[0].shape[1]), lambda i, j: (i, 0))  # x rows, whole
    codes_spec = pl.BlockSpec((weight.values.shape[0], block_cols), lambda i, j: (0, j))  # all weight rows
    group_spec = pl.BlockSpec((groups, block_cols), lambda i, j: (0, j))  # scales (zeros / mins): all groups
    in_specs = [plane_spec] * len(planes) + [codes_spec] + [group_spec] * (len(operands) - len(planes) - 1)
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, group=weight.group_size or rows, bits=weight.bits,
                          signed=weight.signed, offset=offset, float8=weight.is_float8),
        grid=(padded // block_rows, cols // block_cols),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_rows, block_cols), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((padded, cols), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="dequant_matmul",
    )(*operands)
    return out[:num_tokens].reshape(*lead, cols)


@functools.partial(jax.jit, static_argnames=("interpret", "block_rows", "num_warps", "num_stages"))
def dequant_matmul_reference(x: jax.Array, weight: QuantizedTensor, *, interpret: bool = False,
                             block_rows: int = 16, num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """Pure-jnp `x @ weight.dequantize()`, same signature (tuning arguments ignored): the whole weight
    materialized in f32, accumulated in f32, cast to x's dtype."""
    del interpret, block_rows, num_warps, num_stages
    _check_inputs(x, weight)
    y = jnp.matmul(x.astype(jnp.float32), weight.dequantize(jnp.float32), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
