"""Fused SwiGLU activation (vLLM's merged gate/up projection + `silu_and_mul`, FasterTransformer's
fused GEMM + activation): gate and up as one matmul over `w_gate_up`, SiLU-multiply in registers.

    act = fused_swiglu(x, w_gate_up)        # silu(x @ w_gate) * (x @ w_up): [..., intermediate]
    y = act @ w_down                        # the down projection stays a plain matmul

Unfused, the MLP runs two matmuls that each read x, writes both [tokens, intermediate] results,
and reads them back to apply SiLU and multiply: at decode, where a matmul is a read of its weight,
that is two weight passes plus two round trips of the intermediate activations. Fused, each
program reads a tile of the gate and of the up weight side by side, accumulates both products in
f32 and writes only the activated product.

`w_gate_up` is `[hidden, 2 * intermediate]`, gate columns first (vLLM's
`MergedColumnParallelLinear` layout), made from the model's `w_gate` and `w_up` by
`kernel_fusion.fuse_params`.

Kernel design (Triton-lowered Pallas, tested in interpret mode on CPU): grid `(cdiv(rows,
block_rows), intermediate // block_cols)`; a program owns `block_rows` rows of x and `block_cols`
output columns, and walks the hidden dimension in chunks of `block_k` with two `dot`s per chunk
(gate and up tiles are two views of the one weight array, at column blocks j and j +
intermediate / block_cols). Triton's dot needs every dimension >= 16 and power-of-two tiles, so
rows are zero-padded to a multiple of `block_rows` (>= 16) by the wrapper; `block_k` and
`block_cols` must divide hidden and intermediate (the wrapper picks the largest power of two up to
64 / 128 that does). Triton rather than Mosaic GPU for the reasons given in `rms_norm.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def largest_pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    size = 1
    while size * 2 <= cap and n % (size * 2) == 0:
        size *= 2
    return size


def _check_inputs(x: jax.Array, w_gate_up: jax.Array) -> None:
    if x.ndim < 1 or w_gate_up.ndim != 2 or w_gate_up.shape[0] != x.shape[-1] or w_gate_up.shape[1] % 2:
        raise ValueError(f"x must be [..., hidden] and w_gate_up [hidden, 2 * intermediate]; got x {x.shape}, "
                         f"w_gate_up {w_gate_up.shape}")


def _kernel(x_ref, gate_ref, up_ref, out_ref, *, block_k: int):
    block_rows, block_cols = out_ref.shape
    num_chunks = x_ref.shape[1] // block_k

    def body(k, carry):
        gate_acc, up_acc = carry
        chunk = pl.ds(k * block_k, block_k)
        x = x_ref[:, chunk]  # [block_rows, block_k]
        gate_acc += pltriton.dot(x, gate_ref[chunk, :].astype(x.dtype))  # f32[block_rows, block_cols]
        up_acc += pltriton.dot(x, up_ref[chunk, :].astype(x.dtype))
        return gate_acc, up_acc

    zeros = jnp.zeros((block_rows, block_cols), jnp.float32)
    gate, up = jax.lax.fori_loop(0, num_chunks, body, (zeros, zeros))
    out_ref[...] = (jax.nn.silu(gate) * up).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_rows", "num_warps", "num_stages"))
def fused_swiglu(x: jax.Array, w_gate_up: jax.Array, *, interpret: bool = False, block_rows: int = 16,
                 num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """silu(x @ w_gate_up[:, :I]) * (x @ w_gate_up[:, I:]) for x [..., hidden], w_gate_up
    [hidden, 2 I]: [..., I] in x's dtype, accumulated in f32. block_rows: a power of two >= 16."""
    _check_inputs(x, w_gate_up)
    if block_rows < 16 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two >= 16 (Triton's dot), got {block_rows}")
    lead, hidden = x.shape[:-1], x.shape[-1]
    inter = w_gate_up.shape[1] // 2
    block_k, block_cols = largest_pow2_divisor(hidden, 64), largest_pow2_divisor(inter, 128)
    if block_k < 16 or block_cols < 16:
        raise ValueError(f"hidden ({hidden}) and intermediate ({inter}) must be multiples of 16 (Triton's dot)")
    rows = x.reshape(-1, hidden)  # [num_rows, hidden]
    num_rows = rows.shape[0]
    rows_pad = pl.cdiv(max(num_rows, 1), block_rows) * block_rows
    rows = jnp.pad(rows, ((0, rows_pad - num_rows), (0, 0)))
    up_offset = inter // block_cols  # the up half's first column block
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k),
        grid=(rows_pad // block_rows, inter // block_cols),
        in_specs=[pl.BlockSpec((block_rows, hidden), lambda i, j: (i, 0)),  # x rows, whole
                  pl.BlockSpec((hidden, block_cols), lambda i, j: (0, j)),  # gate columns
                  pl.BlockSpec((hidden, block_cols), lambda i, j: (0, j + up_offset))],  # up columns
        out_specs=pl.BlockSpec((block_rows, block_cols), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((rows_pad, inter), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fused_swiglu",
    )(rows, w_gate_up, w_gate_up)
    return out[:num_rows].reshape(*lead, inter)


@functools.partial(jax.jit, static_argnames=("interpret", "block_rows", "num_warps", "num_stages"))
def fused_swiglu_reference(x: jax.Array, w_gate_up: jax.Array, *, interpret: bool = False, block_rows: int = 16,
                           num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """Pure-jnp SwiGLU activation over the merged weight, same signature (tuning arguments ignored)."""
    del interpret, block_rows, num_warps, num_stages
    _check_inputs(x, w_gate_up)
    inter = w_gate_up.shape[1] // 2
    both = jnp.matmul(x, w_gate_up.astype(x.dtype), preferred_element_type=jnp.float32)  # f32[..., 2 I]
    return (jax.nn.silu(both[..., :inter]) * both[..., inter:]).astype(x.dtype)
