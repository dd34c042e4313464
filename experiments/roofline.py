"""The matmul roofline of this machine, as a decode rate: how many tokens/s a decoder whose every
weight multiply ran at the best GEMM speed measured here would reach.

A decode token costs 2 FLOPs per matmul weight (the q/k/v/o projections, the MLP and the LM head;
attention over the context and the norms are left out, so the bound is optimistic). The run times a
square f32 GEMM (`size` x `size` x `size`, median of `iterations` calls) with XLA, which our engine
uses, and with torch (OpenBLAS/MKL, what HF uses), and reports the XLA one as `decode_tokens_per_s`.
A claim can then compare our large-batch decode with it (`ratio_to: roofline`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import models
from experiments.trace import RunTrace


def matmul_flops_per_token(config) -> int:
    """2 x the matmul weights a token multiplies: projections, MLP and the LM head."""
    per_layer = (config.hidden_size * (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
                 + config.num_heads * config.head_dim * config.hidden_size
                 + 3 * config.hidden_size * config.intermediate_size)
    return 2 * (config.num_layers * per_layer + config.vocab_size * config.hidden_size)


def median_seconds(fn, iterations: int) -> float:
    """Median wall time of `fn()` over `iterations` calls, after one untimed call (compile, caches)."""
    return paired_median_seconds([fn], iterations)[0]


def paired_median_seconds(fns, iterations: int, warmups: int = 1) -> list[float]:
    """Median wall time of each of `fns` over `iterations` rounds that call them in turn, after
    `warmups` untimed rounds (compile, caches): alternation gives every fn the same machine, where
    runs minutes apart drift by more than the differences measured."""
    for _ in range(warmups):
        for fn in fns:
            fn()
    times = np.zeros((iterations, len(fns)))
    for i in range(iterations):
        for j, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i, j] = time.perf_counter() - start
    return [float(t) for t in np.median(times, axis=0)]


def gemm_gflops_xla(size: int, iterations: int) -> float:
    a, b = (jnp.asarray(np.random.default_rng(i).standard_normal((size, size)), jnp.float32) for i in (0, 1))
    matmul = jax.jit(jnp.matmul)
    return 2 * size**3 / median_seconds(lambda: matmul(a, b).block_until_ready(), iterations) / 1e9


def gemm_gflops_torch(size: int, iterations: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / median_seconds(lambda: torch.matmul(a, b), iterations) / 1e9


class GemmRooflineEngine:
    """Serves no requests: measures the GEMM speed and turns it into the model's decode bound."""

    times_itself = True  # warms up and times each measurement inside serve: compiles there are not timed

    def __init__(self, model: models.Model, run_config, requests):
        del requests
        self.run_config, self.flops_per_token = run_config, matmul_flops_per_token(model.config)

    def warmup(self) -> None:
        pass  # each measurement warms itself up

    precompile = warmup  # nothing to compile ahead: the GEMM compiles and warms up inside its measurement

    def serve(self, requests, progress) -> RunTrace:
        size, iterations = self.run_config.size, self.run_config.iterations
        start = time.perf_counter()
        xla = gemm_gflops_xla(size, iterations)
        torch_gflops = gemm_gflops_torch(size, iterations)
        progress(len(requests))
        extra = {"gemm_gflops": xla, "gemm_gflops_torch": torch_gflops,
                 "decode_tokens_per_s": xla * 1e9 / self.flops_per_token,
                 "flops_per_token": self.flops_per_token}
        return RunTrace([], time.perf_counter() - start, 0, 0, 1.0, 0, simulated=True, extra_metrics=extra)
