"""Where batch-1 decode time goes on XLA CPU: `python -m experiments.matvec_chain [--batch 1 2 4]`.

Times the weight matmuls of one SmolLM2-135M decode step alone (30 layers of q/k/v/o/gate/up/down
projections, then the LM head; no attention, norms or sampling), each layer's input depending on
the previous one as in the model, and, for comparison, the same bytes of weights read by
*independent* batch-1 matvecs (nothing waits on anything). Prints ms and weight GB/s for each.
A batch-1 step must read every weight once (538 MB in f32), so GB/s is its speed limit; llama.cpp
F32 reads them at ~35 GB/s on these 2 cores (64.9 tok/s, `decode_batch1.yaml`).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments.decode_step import random_model
from experiments.roofline import median_seconds

PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@jax.jit
def weight_matmuls(x, layers, embed):
    """x f32[B, hidden] through every projection of every layer in model order; -> f32[B, vocab]."""
    h = x
    for layer in layers:
        q, k, v = h @ layer["wq"], h @ layer["wk"], h @ layer["wv"]
        o = q @ layer["wo"] + 0 * (k.sum() + v.sum())  # k, v would go to the cache
        gate, up = o @ layer["w_gate"], o @ layer["w_up"]
        h = h + (jax.nn.silu(gate) * up) @ layer["w_down"]
    return h @ embed.T


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
    args = parser.parse_args()
    params = random_model().params
    layers = [{name: layer[name] for name in PROJECTIONS} for layer in params["layers"]]
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
