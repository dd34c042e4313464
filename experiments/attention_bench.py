"""Decode-attention micro-benchmark (vLLM Fig. 18a): one layer's attention for a batch of sequences
at a fixed context length, over a contiguous cache vs a paged one at equal shapes.

The paged cache's blocks are a random permutation of the pool (as after hours of serving), so every
page read goes through the block table. Backends: `contiguous` (dense attention over
`[batch, kv_heads, context, head_dim]`), `paged_reference` (the jnp reference: gather the pages,
then the same dense attention), `paged` (the Pallas decode kernel: compiled on a GPU, interpreted
elsewhere, where its time means nothing). Time is the median of `iterations` calls.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import models
from experiments.trace import RunTrace
from paged_attention.contiguous import causal_attention
from paged_attention.decode_kernel import paged_decode_attention, paged_decode_attention_reference


class AttentionBenchEngine:
    def __init__(self, model: models.Model, run_config, requests):
        del requests  # shapes come from the run config and the model
        cfg, rng = model.config, np.random.default_rng(0)
        self.run_config = run_config
        batch, context, bs = run_config.batch_size, run_config.context_len, run_config.block_size
        dtype = model.params["embed"].dtype
        self.q = jnp.asarray(rng.standard_normal((batch, cfg.num_heads, cfg.head_dim)), dtype)
        kv = rng.standard_normal((2, batch, cfg.num_kv_heads, context, cfg.head_dim)).astype(np.float32)
        self.kv_bytes = 2 * batch * cfg.num_kv_heads * context * cfg.head_dim * jnp.dtype(dtype).itemsize
        if run_config.backend == "contiguous":
            k, v = jnp.asarray(kv[0], dtype), jnp.asarray(kv[1], dtype)
            q_pos = jnp.full((batch, 1), context - 1, jnp.int32)
            k_pos = jnp.arange(context, dtype=jnp.int32)[None]
            fn = jax.jit(lambda q: causal_attention(q[:, None], k, v, q_pos, k_pos)[:, 0])
        else:
            blocks_per_seq = -(-context // bs)
            perm = rng.permutation(batch * blocks_per_seq).astype(np.int32)
            tables = perm.reshape(batch, blocks_per_seq)
            pad = blocks_per_seq * bs - context
            pages = np.pad(kv, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))  # [2, B, KVH, blocks*bs, D]
            pages = pages.reshape(2, batch, cfg.num_kv_heads, blocks_per_seq, bs, cfg.head_dim)
            cache = np.zeros((2, cfg.num_kv_heads, batch * blocks_per_seq, bs, cfg.head_dim), np.float32)
            cache[:, :, tables.reshape(-1)] = pages.transpose(0, 2, 1, 3, 4, 5).reshape(
                2, cfg.num_kv_heads, batch * blocks_per_seq, bs, cfg.head_dim)
            k_cache, v_cache = jnp.asarray(cache[0], dtype), jnp.asarray(cache[1], dtype)
            tables, lens = jnp.asarray(tables), jnp.full((batch,), context, jnp.int32)
            if run_config.backend == "paged":
                interpret = jax.default_backend() != "gpu"
                fn = lambda q: paged_decode_attention(q, k_cache, v_cache, tables, lens, interpret=interpret)
            else:
                fn = jax.jit(lambda q: paged_decode_attention_reference(q, k_cache, v_cache, tables, lens))
        self.fn = fn

    def warmup(self) -> None:
        self.fn(self.q).block_until_ready()

    def serve(self, requests, progress) -> RunTrace:
        times = []
        for _ in range(self.run_config.iterations):
            start = time.perf_counter()
            self.fn(self.q).block_until_ready()
            times.append(time.perf_counter() - start)
        progress(len(requests))
        seconds = float(np.median(times))
        extra = {"attention_us_per_call": 1e6 * seconds, "kv_gb_per_s": self.kv_bytes / seconds / 1e9,
                 "device": jax.default_backend()}
        return RunTrace([], float(np.sum(times)), self.kv_bytes, self.kv_bytes, 1.0, 0,
                        simulated=True, extra_metrics=extra)
