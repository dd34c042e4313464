"""Time one decode step of the paged model runner at ShareGPT-like context lengths:
`python -m experiments.decode_step [--backend paged_cpu] [--batch 64 200 256]`.

Seeded random SmolLM2-135M weights (speed does not depend on their values); contexts drawn from a
gamma distribution with mean ~190 tokens, capped at 1,200 (ShareGPT decode with outputs capped at
256); each sequence's pages scattered over the pool. Prints ms per step and tokens/s per batch size.
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

import models
from continuous_batching.model_runner import PagedModelRunner
from continuous_batching.request import Sequence
from experiments.run import keep_freed_memory
from models.config import PRESETS
from paged_attention.backend_names import PAGED_BACKENDS
from models.llama import init_params


def random_model() -> models.Model:
    """Seeded random SmolLM2-135M weights: step speed does not depend on their values."""
    config = PRESETS["smollm2-135m"]
    return models.Model(config, init_params(config, 0, jnp.float32, 0.02))


def scattered_runner(model: models.Model, context_lens, rng, backend: str, block_size: int = 16,
                     kernels="xla", runner_class=PagedModelRunner, **placement):
    """A runner (ops set `kernels`; `placement`: the runner's kv_cache_dtype / mesh / param_sharding /
    kv_sharding) whose pool holds exactly these sequences' pages, scattered at random; returns
    (runner, each sequence's block table)."""
    pages = -(-np.asarray(context_lens) // block_size)
    perm = rng.permutation(int(pages.sum()) + 8)
    runner = runner_class(model, num_blocks=len(perm), block_size=block_size,
                              max_num_seqs=max(256, len(pages)), max_blocks_per_seq=80, backend=backend, kernels=kernels,
                              **placement)
    offsets = np.concatenate([[0], np.cumsum(pages)])
    return runner, [perm[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def time_steps(runner: PagedModelRunner, seqs: list[Sequence], repeats: int) -> tuple[float, float]:
    """(ms per step over `repeats` steps, compile + first step s)."""
    start = time.perf_counter()
    runner.step(seqs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        runner.step(seqs)
    return (time.perf_counter() - start) / repeats * 1e3, first


def time_decode_step(model: models.Model, batch: int, backend: str, block_size: int = 16, repeats: int = 3):
    """(ms per step, mean context, compile + first step s) for `batch` sequences decoding together."""
    rng = np.random.default_rng(batch)
    ctx = np.minimum(rng.gamma(1.2, 190 / 1.2, batch).astype(int) + 1, 1200)
    runner, tables = scattered_runner(model, ctx, rng, backend, block_size)
    ms, first = time_steps(runner, [Sequence.in_cache(t, int(c), [5]) for t, c in zip(tables, ctx)], repeats)
    return ms, float(ctx.mean()), first


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.decode_step", description=__doc__)
    parser.add_argument("--backend", default="paged_cpu", choices=PAGED_BACKENDS)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 200, 256])
    args = parser.parse_args()
    keep_freed_memory()
    model = random_model()
    print(f"| batch | mean context | ms / step | tok/s | compile + first step s |  ({args.backend})")
    print("|---|---|---|---|---|")
    for batch in args.batch:
        ms, mean_ctx, first = time_decode_step(model, batch, args.backend)
        print(f"| {batch} | {mean_ctx:.0f} | {ms:.0f} | {batch / ms * 1e3:.0f} | {first:.1f} |", flush=True)


if __name__ == "__main__":
    main()
