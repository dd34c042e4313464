"""Fused residual add + RMSNorm (vLLM's `fused_add_rms_norm`, FasterTransformer's
add-bias-residual-layernorm without the bias): one pass over each row instead of three.

    normed, residual = fused_add_rms_norm(x, residual, weight, eps=1e-5)
    # residual = x + residual;  normed = weight * RMSNorm(residual)

Unfused, a decoder layer reads x and the residual, writes their sum, reads it back to square and
average it, then reads it once more to scale it: three round trips to memory for an op that does a
few flops per element, so its time is the bytes moved. Fused, each row is read once and two rows
(the sum and the normed output) are written.

Kernel design (Triton-lowered Pallas, tested in interpret mode on CPU): grid `(cdiv(num_rows,
block_rows),)`, one program per `block_rows` rows, each holding its rows whole (`[block_rows,
hidden_pad]`). Triton tensors have power-of-two sizes, so the wrapper pads the hidden dimension
with zeros up to `hidden_pad` (zeros add nothing to the sum of squares, and the mean divides by the
real `hidden`) and the rows up to a multiple of `block_rows`; padding is sliced off the outputs.
The sum is formed in the input dtype and the statistics in f32, then cast back before the weight
multiplies, the order HF Llama uses (`models.ops.rms_norm`), so the kernel matches the model's own
op to the dtype's rounding.

Why Triton rather than Mosaic GPU (jax 0.10's default `pallas_call` lowering): a row reduction
over one tile is what Triton's block model expresses directly, it runs on every CUDA GPU Triton
supports (Mosaic GPU targets Hopper and later), and its lowering rules can be checked on a CPU
machine by exporting for CUDA (`tests/kernel_fusion`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

DEFAULT_BLOCK_ROWS = 16


def _check_inputs(x: jax.Array, residual: jax.Array | None, weight: jax.Array) -> None:
    if x.ndim < 1:
        raise ValueError(f"x must be [..., hidden], got shape {x.shape}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {x.shape}, got {residual.shape}")
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [hidden] = ({x.shape[-1]},), got {weight.shape}")


def _kernel(*refs, eps: float, hidden: int, has_residual: bool):
    if has_residual:
        x_ref, res_ref, w_ref, out_ref, new_res_ref = refs
        x = x_ref[...] + res_ref[...]  # [block_rows, hidden_pad] in the input dtype
        new_res_ref[...] = x
    else:
        x_ref, w_ref, out_ref = refs
        x = x_ref[...]
    x32 = x.astype(jnp.float32)
    mean_square = jnp.sum(x32 * x32, axis=1, keepdims=True) / hidden  # f32[block_rows, 1]
    normed = (x32 * jax.lax.rsqrt(mean_square + eps)).astype(x.dtype)
    out_ref[...] = (w_ref[...][None, :] * normed).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "block_rows", "num_warps"))
def fused_add_rms_norm(x: jax.Array, residual: jax.Array | None, weight: jax.Array, *, eps: float,
                       interpret: bool = False, block_rows: int = DEFAULT_BLOCK_ROWS,
                       num_warps: int = 4) -> tuple[jax.Array, jax.Array]:
    """(weight * RMSNorm(x + residual), x + residual); with residual None, (weight * RMSNorm(x), x).

    x, residual: [..., hidden] (same dtype); weight: [hidden]. The normed output has the dtype of
    `weight * x` (the model's weights and activations share one dtype). block_rows: rows per
    program, a power of two.
    """
    _check_inputs(x, residual, weight)
    if block_rows < 1 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two, got {block_rows}")
    lead, hidden = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, hidden)  # [num_rows, hidden]
    num_rows = rows.shape[0]
    hidden_pad, rows_pad = pl.next_power_of_2(hidden), pl.cdiv(max(num_rows, 1), block_rows) * block_rows
    pad = ((0, rows_pad - num_rows), (0, hidden_pad - hidden))
    inputs = [jnp.pad(rows, pad)]
    if residual is not None:
        inputs.append(jnp.pad(residual.reshape(-1, hidden), pad))
    inputs.append(jnp.pad(weight, (0, hidden_pad - hidden)))
    row_block = pl.BlockSpec((block_rows, hidden_pad), lambda i: (i, 0))
    out_dtype = jnp.result_type(weight.dtype, x.dtype)
    out_shape = [jax.ShapeDtypeStruct((rows_pad, hidden_pad), out_dtype)]
    if residual is not None:
        out_shape.append(jax.ShapeDtypeStruct((rows_pad, hidden_pad), x.dtype))
    outs = pl.pallas_call(
        functools.partial(_kernel, eps=eps, hidden=hidden, has_residual=residual is not None),
        grid=(rows_pad // block_rows,),
        in_specs=[row_block] * (len(inputs) - 1) + [pl.BlockSpec((hidden_pad,), lambda i: (0,))],
        out_specs=[row_block] * len(out_shape),
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="fused_add_rms_norm",
    )(*inputs)
    normed = outs[0][:num_rows, :hidden].reshape(*lead, hidden)
    summed = x if residual is None else outs[1][:num_rows, :hidden].reshape(*lead, hidden)
    return normed, summed


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "block_rows", "num_warps"))
def fused_add_rms_norm_reference(x: jax.Array, residual: jax.Array | None, weight: jax.Array, *, eps: float,
                                 interpret: bool = False, block_rows: int = DEFAULT_BLOCK_ROWS,
                                 num_warps: int = 4) -> tuple[jax.Array, jax.Array]:
    """Pure-jnp add + RMSNorm, same signature (the tuning arguments are ignored)."""
    del interpret, block_rows, num_warps
    _check_inputs(x, residual, weight)
    summed = x if residual is None else x + residual
    x32 = summed.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype), summed
