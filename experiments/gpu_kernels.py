"""The GPU checks of the kernel-fusion and quantization issues as one short script, for a session
that is lent a GPU: `PYTHONPATH=. python -m experiments.gpu_kernels [--json FILE]`.

For each Pallas kernel it times, alternately in one run, the kernel compiled for the GPU, the same op
as XLA compiles its jnp reference, tokamax's kernel where tokamax has the op (and is installed), and
a device copy (`y = -x`, one read and one write of as many bytes as the norm moves). Memory-bound ops
(RMSNorm, SwiGLU and the dequant-matmul at decode-like row counts, over large weights) report GB/s:
the bytes the op must move (inputs read once, outputs written once, from shapes) over its median
time, and that as a fraction of the copy's GB/s. Flash prefill attention reports causal TFLOP/s.
Every row also gives its output's largest difference from the XLA row, so a kernel that compiles
wrong shows. Off a GPU the kernels run interpreted on tiny shapes (`--small` is then implied): a
check that the script runs, whose times mean nothing.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.roofline import paired_median_seconds
from kernel_fusion.flash_attention import flash_attention, flash_attention_reference
from kernel_fusion.rms_norm import fused_add_rms_norm, fused_add_rms_norm_reference
from kernel_fusion.swiglu import fused_swiglu, fused_swiglu_reference
from quantization.dequant_matmul import dequant_matmul, dequant_matmul_reference
from quantization.weight_only import quantize_weight

# shapes: (GPU, tiny for interpreted runs); Llama-3-8B's hidden / intermediate sizes on the GPU
SHAPES = {
    "rms_rows_hidden": ((16384, 8192), (24, 576)),
    "swiglu_rows_hidden_inter": ((64, 4096, 14336), (16, 64, 128)),
    "flash_tokens_heads_kv_dim": ((4096, 32, 8, 128), (48, 4, 2, 64)),
    "dequant_rows_in_out": ((16, 4096, 14336), (16, 256, 128)),
}


def _tokamax():
    """tokamax with its absl flags parsed, or None when it is not installed."""
    try:
        import tokamax
        from absl import flags
    except ImportError:
        return None
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def _normal(seed: int, shape, dtype, scale: float = 1.0) -> jax.Array:
    return (scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def _nbytes(*arrays) -> int:
    return sum(leaf.nbytes for a in arrays for leaf in jax.tree_util.tree_leaves(a))


def _check(name: str, impls: dict[str, Callable], moved_bytes: int | None, flops: float | None,
           iterations: int) -> list[dict]:
    """Time each implementation (alternating rounds), compare its output with the `xla` one."""
    outs = {impl: np.asarray(jax.tree_util.tree_leaves(fn())[0], np.float32) for impl, fn in impls.items()}
    times = paired_median_seconds([lambda fn=fn: jax.block_until_ready(fn()) for fn in impls.values()], iterations)
    rows = []
    for (impl, out), seconds in zip(outs.items(), times):
        rows.append({"check": name, "impl": impl, "ms": seconds * 1e3,
                     "gb_per_s": None if moved_bytes is None else moved_bytes / seconds / 1e9,
                     "tflop_per_s": None if flops is None else flops / seconds / 1e12,
                     "max_abs_diff_vs_xla": float(np.abs(out - outs["xla"]).max())})
    return rows


def run_checks(small: bool, interpret: bool, iterations: int) -> list[dict]:
    """All the rows; each memory-bound row gains `fraction_of_copy` (its GB/s over the copy's)."""
    pick = 1 if small else 0
    dtype, tokamax = jnp.bfloat16, _tokamax()
    tk_impl = {"implementation": "xla"} if jax.default_backend() == "cpu" else {}
    rows = []

    num_rows, hidden = SHAPES["rms_rows_hidden"][pick]
    x, residual = _normal(0, (num_rows, hidden), dtype), _normal(1, (num_rows, hidden), dtype)
    weight = 1 + _normal(2, (hidden,), dtype, 0.1)
    copy = jax.jit(jnp.negative)
    rows += _check("copy", {"xla": lambda: copy(x)}, 2 * x.nbytes, None, iterations)
    impls = {"pallas": lambda: fused_add_rms_norm(x, None, weight, eps=1e-5, interpret=interpret),
             "xla": lambda: fused_add_rms_norm_reference(x, None, weight, eps=1e-5)}
    if tokamax is not None:
        norm = jax.jit(lambda x, w: tokamax.layer_norm(x, w, None, epsilon=1e-5, subtract_mean=False, **tk_impl))
        impls["tokamax"] = lambda: norm(x, weight)
    rows += _check("rms_norm", impls, 2 * x.nbytes + weight.nbytes, None, iterations)
    rows += _check("add_rms_norm", {
        "pallas": lambda: fused_add_rms_norm(x, residual, weight, eps=1e-5, interpret=interpret),
        "xla": lambda: fused_add_rms_norm_reference(x, residual, weight, eps=1e-5)},
        4 * x.nbytes + weight.nbytes, None, iterations)

    num_rows, hidden, inter = SHAPES["swiglu_rows_hidden_inter"][pick]
    h = _normal(3, (num_rows, hidden), dtype)
    w_gate_up = _normal(4, (hidden, 2 * inter), dtype, hidden ** -0.5)
    impls = {"pallas": lambda: fused_swiglu(h, w_gate_up, interpret=interpret),
             "xla": lambda: fused_swiglu_reference(h, w_gate_up)}
    if tokamax is not None:
        w_k2n = jnp.stack([w_gate_up[:, :inter], w_gate_up[:, inter:]], axis=1)  # tokamax's [K, 2, N]
        glu = jax.jit(lambda h, w: tokamax.gated_linear_unit(h, w, activation=jax.nn.swish, **tk_impl))
        impls["tokamax"] = lambda: glu(h, w_k2n)
    rows += _check("swiglu", impls, _nbytes(h, w_gate_up) + num_rows * inter * h.dtype.itemsize, None, iterations)

    num_rows, rows_in, cols = SHAPES["dequant_rows_in_out"][pick]
    a = _normal(5, (num_rows, rows_in), dtype)
    q4 = quantize_weight(_normal(6, (rows_in, cols), jnp.float32, rows_in ** -0.5), 4, 128)
    rows += _check("dequant_matmul_int4_g128", {
        "pallas": lambda: dequant_matmul(a, q4, interpret=interpret),
        "xla": lambda: dequant_matmul_reference(a, q4)},
        _nbytes(a, q4) + num_rows * cols * a.dtype.itemsize, None, iterations)

    tokens, heads, kv_heads, dim = SHAPES["flash_tokens_heads_kv_dim"][pick]
    q = _normal(7, (1, tokens, heads, dim), dtype)
    k, v = _normal(8, (1, tokens, kv_heads, dim), dtype), _normal(9, (1, tokens, kv_heads, dim), dtype)
    impls = {"pallas": lambda: flash_attention(q, k, v, interpret=interpret),
             "xla": lambda: flash_attention_reference(q, k, v)}
    if tokamax is not None:
        attend = jax.jit(lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True, **tk_impl))
        impls["tokamax"] = lambda: attend(q, k, v)
    causal_flops = 4 * heads * dim * tokens * (tokens + 1) / 2  # QK^T and PV over the causal half
    rows += _check("flash_prefill", impls, None, causal_flops, iterations)

    copy_gb_per_s = rows[0]["gb_per_s"]
    for row in rows:
        row["fraction_of_copy"] = None if row["gb_per_s"] is None else row["gb_per_s"] / copy_gb_per_s
    return rows


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m experiments.gpu_kernels", description=__doc__)
    parser.add_argument("--small", action="store_true", help="tiny shapes (implied off a GPU)")
    parser.add_argument("--iterations", type=int, default=20, help="timed rounds (median)")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    rows = run_checks(small=args.small or not on_gpu, interpret=not on_gpu, iterations=args.iterations)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}"
          + ("" if on_gpu else ": kernels interpreted, times mean nothing"))
    print("| check | impl | ms | GB/s | of copy | TFLOP/s | max abs diff vs xla |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['check']} | {r['impl']} | {r['ms']:.3f} | {_cell(r['gb_per_s'], '{:.0f}')} | "
              f"{_cell(r['fraction_of_copy'], '{:.0%}')} | {_cell(r['tflop_per_s'], '{:.1f}')} | "
              f"{r['max_abs_diff_vs_xla']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": jax.default_backend(), "jax": jax.__version__, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
