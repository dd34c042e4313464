"""Where batch-1 decode time goes on XLA CPU: `python -m experiments.matvec_chain [--batch 1 2 4]`.

Times the weight matmuls of one SmolLM2-135M decode step alone (30 layers of q/k/v/o/gate/up/down
projections, then the LM head; no attention, norms or sampling), each layer's input depending on
the previous one as in the model, and, for comparison, the same bytes of weights read by
*independent* batch-1 matvecs (nothing waits on anything). Prints ms and weight GB/s for each.
A batch-1 step must read every weight once (538 MB in f32), so GB/s is its speed limit; llama.cpp
F32 reads them at ~35 GB/s on these 2 cores (64.9 tok/s, `decode_batch1.yaml`).

`--quantized` times the same chain (projections only) with int8 per-channel and int4-g32 weights,
each written two ways: a dot over the dequantized weight (what the model's `linear` does: XLA CPU
writes an f32 copy of the weight first) and `quantization.reduce_matmul`'s multiply-reduce (which
reads the codes inside one fusion); and as W8A8 (`quantization.w8a8`: an s8 x s8 -> s32 dot), with
a single row padded to two as `int8_dot` does and without (XLA CPU's one-row s8 dot is slow); and
int8 weights in groups of 32 rows (Q8_0's layout) multiplied as llama.cpp multiplies Q8_0 blocks
(`blockwise_int8_matmul`: activations rounded to int8 per group, one s8 dot per group).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments.decode_step import random_model
from experiments.roofline import median_seconds
from quantization.reduce_matmul import reduce_matmul
from quantization.w8a8 import quantize_activations, quantize_w8a8
from quantization.weight_only import quantize_weight

PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def projection_chain(matmul):
    """A jitted chain of every layer's projections in model order, each `matmul(x, weight)`."""
    @jax.jit
    def chain(x, layers):
        h = x
        for layer in layers:
            q, k, v = (matmul(h, layer[name]) for name in ("wq", "wk", "wv"))
            o = matmul(q, layer["wo"]) + 0 * (k.sum() + v.sum())
            h = h + matmul(jax.nn.silu(matmul(o, layer["w_gate"])) * matmul(o, layer["w_up"]), layer["w_down"])
        return h
    return chain


def blockwise_int8_matmul(x, weight):
    """x f32[tokens, in] times int8 codes in groups of rows (`QuantizedTensor`, bits 8, symmetric:
    Q8_0's layout) the way llama.cpp multiplies Q8_0: each token's activations rounded to int8 per
    group (one scale per token and group), an s8 x s8 -> s32 dot per group (batched over groups),
    then both scales applied and the groups summed; a single token padded to two rows, as
    `int8_dot` pads it. f32[tokens, out]."""
    rows, out = weight.shape
    group = weight.group_size or rows
    if weight.bits != 8 or weight.zeros is not None or weight.mins is not None or rows % group:
        raise ValueError("blockwise_int8_matmul takes symmetric 8-bit codes in whole groups (Q8_0's layout), got "
                         f"bits {weight.bits}, zeros/mins {weight.zeros is not None or weight.mins is not None}, "
                         f"{rows} rows in groups of {group}")
    tokens, groups = x.shape[0], rows // group
    if tokens == 1:
        return blockwise_int8_matmul(jnp.pad(x, ((0, 1), (0, 0))), weight)[:1]
    # s8[tokens, groups, group], f32[tokens, groups, 1]: W8A8's per-token rounding, once per group
    xq, act = quantize_activations(x.reshape(tokens, groups, group), None, None)
    acc = jax.lax.dot_general(xq, weight.values.reshape(groups, group, out), (((2,), (1,)), ((1,), (0,))),
                              preferred_element_type=jnp.int32)  # s32[groups, tokens, out]
    return jnp.einsum("gto,tg,go->to", acc.astype(jnp.float32), act[..., 0], weight.scales.astype(jnp.float32))


def time_quantized(layers, batches) -> None:
    """The projection chain in f32, with int8 / int4-g32 weights as dequantize + dot or
    multiply-reduce, as W8A8 (int8 activations too) with and without the one-row padding, and with
    Q8_0-layout int8 weights as llama.cpp's per-group integer dots."""
    dequantize_dot = projection_chain(lambda x, w: x @ (w if isinstance(w, jax.Array) else w.dequantize(jnp.float32)))
    reduce = projection_chain(reduce_matmul)
    quantized = {f"int{bits}": [{n: quantize_weight(w, bits, group) for n, w in layer.items()} for layer in layers]
                 for bits, group in ((8, 0), (4, 32))}
    w8a8_weights = [{n: quantize_w8a8(w) for n, w in layer.items()} for layer in layers]
    w8a8 = projection_chain(lambda x, w: w.matmul(x))
    w8a8_unpadded = projection_chain(lambda x, w: w.matmul(x, pad_single_row=False))
    q8_0 = [{n: quantize_weight(w, 8, 32) for n, w in layer.items()} for layer in layers]
    blockwise = projection_chain(blockwise_int8_matmul)
    print("| weights | matmul | batch | ms |")
    print("|---|---|---|---|")
    for batch in batches:
        x = jnp.ones((batch, 576), jnp.float32)
        print(f"| f32 | dot | {batch} | {time_ms(dequantize_dot, x, layers):.1f} |", flush=True)
        for name, weights in quantized.items():
            for label, chain in (("dequantize + dot", dequantize_dot), ("multiply-reduce", reduce)):
                print(f"| {name} | {label} | {batch} | {time_ms(chain, x, weights):.1f} |", flush=True)
        for label, chain in (("s8 x s8 -> s32 dot", w8a8), ("the same, one row unpadded", w8a8_unpadded)):
            print(f"| w8a8 | {label} | {batch} | {time_ms(chain, x, w8a8_weights):.1f} |", flush=True)
        print(f"| int8 groups of 32 (Q8_0) | llama.cpp's: int8 activations per group, s8 dots batched over groups "
              f"| {batch} | {time_ms(blockwise, x, q8_0):.1f} |", flush=True)


@jax.jit
def weight_matmuls(x, layers, embed):
    """x f32[B, hidden] through every projection of every layer in model order; -> f32[B, vocab]."""
    return projection_chain(jnp.matmul)(x, layers) @ embed.T


@jax.jit
def independent_matvecs(x, weights):
    """x f32[1, 576] times each weight matrix; no matvec waits on another."""
    return [x @ w for w in weights]


def time_ms(fn, *args, repeats: int = 20) -> float:
    """Median ms of one call of `fn(*args)`, waited for."""
    return median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.matvec_chain", description=__doc__)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--quantized", action="store_true", help="time int8 / int4 projections instead")
    args = parser.parse_args()
    params = random_model().params
    layers = [{name: layer[name] for name in PROJECTIONS} for layer in params["layers"]]
    if args.quantized:
        return time_quantized(layers, args.batch)
    weight_bytes = sum(w.nbytes for layer in layers for w in layer.values()) + params["embed"].nbytes
    print("| what | batch | ms | weight GB/s |")
    print("|---|---|---|---|")
    for batch in args.batch:
        x = jnp.ones((batch, params["embed"].shape[1]), jnp.float32)
        ms = time_ms(weight_matmuls, x, layers, params["embed"])
        print(f"| 30 layers' projections + LM head, in model order | {batch} | {ms:.1f} | "
              f"{weight_bytes / ms / 1e6:.1f} |", flush=True)
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal((576, 1536), np.float32)) for _ in range(60)]
    ms = time_ms(independent_matvecs, jnp.ones((1, 576), jnp.float32), weights)
    print(f"| 60 independent 576x1536 matvecs | 1 | {ms:.1f} | {sum(w.nbytes for w in weights) / ms / 1e6:.1f} |")


if __name__ == "__main__":
    main()
