"""Kernel-fusion micro-benchmark: one decoder layer and each op in it, under one ops set
(`kernels: unfused | xla | pallas`), at a decode batch or a prefill chunk of the real model's shapes.

Inputs are a real engine step's: a `PagedModelRunner` on the model (its params prepared for the ops
set), sequences whose pages are scattered over the pool, and the step's own metadata. Then:

- **per-op time**: each op of the seam on that step's layer-0 inputs (`add_rms_norm`, `qkv_rope`,
  `attention` = cache write + paged attention, `self_attention` = both, `o_proj`, `swiglu_mlp`), and
  the whole `decoder_layer`; under `unfused` each called as the ops set calls it (one compiled
  program per op, dispatched from Python), under `xla` / `pallas` each compiled as one program.
  Caches are donated and carried from call to call, as in the engine. Median of `iterations`.
  `fuse_weights` runs the `xla` set on the fused `wqkv` / `w_gate_up` layout (7 matmuls a layer
  become 4), separating what merged weights buy from what fused kernels buy.
- **step time**: the runner's whole step (30 layers, LM head, sampling), median of `iterations`.
- **bytes per op** (`fusion_bytes`): what each op must move at the least (inputs read once, outputs
  written once, weights read once) and what its unfused sequence moves (every intermediate written
  and read back); with the time, achieved GB/s.
- **HLO evidence**: programs dispatched per layer (top-level calls in the traced layer: one under a
  compiled layer), XLA fusions in the compiled layer (`xla`), Pallas kernels in the layer.
- **correctness**: the layer's largest difference from the `xla` set's layer on the same inputs.

Pallas kernels run compiled only on a GPU; elsewhere they run interpreted, which checks them but
times nothing meaningful, so a `pallas` run off a GPU reports its evidence and its difference and no
times (None).
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

import models
from continuous_batching.request import Sequence
from experiments.decode_step import scattered_runner
from experiments.fusion_bytes import op_bytes
from experiments.metric_names import FUSION_OPS as OPS
from experiments.trace import RunTrace
from kernel_fusion.fuse_params import fuse_params
from models.llama import decoder_layer
from models.ops import Ops, get_ops


def _median_us(fn, args, cache_at: int | None, iterations: int) -> float:
    """Median µs of `fn(*args)` over `iterations` calls after two warm-up calls; when `cache_at` is
    given, the call returns (..., cache) last and the cache is fed back (donated) at that position."""
    args, times = list(args), []
    for i in range(iterations + 2):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        if i >= 2:
            times.append(time.perf_counter() - start)
        if cache_at is not None:
            args[cache_at] = out[-1]
    return 1e6 * float(np.median(times))


def _count_fusions(hlo_text: str) -> int:
    """Fusion instructions in compiled HLO (each is one kernel XLA generated)."""
    return len(re.findall(r"\bfusion\(", hlo_text))


def _count_pallas_calls(jaxpr) -> int:
    """pallas_call equations in a jaxpr and every jaxpr nested in its equations' params."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "pallas_call"
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
                if hasattr(sub, "eqns"):
                    count += _count_pallas_calls(sub)
    return count


def _fresh(args: tuple, cache_at: int | None) -> tuple:
    """args with a copy of the cache at `cache_at` (a call that donates it leaves the original intact)."""
    if cache_at is None:
        return args
    return (*args[:cache_at], jax.tree.map(jnp.copy, args[cache_at]), *args[cache_at + 1:])


class FusionBenchEngine:
    times_itself = True  # warms up and times each measurement inside serve

    def __init__(self, model: models.Model, run_config, requests):
        del requests  # shapes come from the run config
        if run_config.fuse_weights:  # the xla set on the fused layout (config_checks allows it there only)
            model = dataclasses.replace(model, params=fuse_params(model.params))
        self.run_config, self.model = run_config, model
        self.ops = get_ops(run_config.kernels)
        self.timed = not (run_config.kernels == "pallas" and jax.default_backend() != "gpu")
        rng = np.random.default_rng(0)
        if run_config.phase == "decode":
            lens = [run_config.context_len] * run_config.batch_size
        else:
            lens = [run_config.prompt_len]
        runner, tables = scattered_runner(model, lens, rng, run_config.backend, run_config.block_size,
                                          kernels=self.ops)
        new = [[5] if run_config.phase == "decode" else list(range(1, n + 1)) for n in lens]
        self.seqs = [Sequence.in_cache(t, n, tokens) for t, n, tokens in zip(tables, lens, new)]
        self.runner = runner
        self.num_tokens, self.context_tokens = sum(len(t) for t in new), sum(lens)

    def warmup(self) -> None:
        pass  # each measurement warms itself up

    def _layer_inputs(self):
        runner = self.runner
        tokens, positions, metadata, _, _, (cos, sin) = jax.device_put(runner.prepare(self.seqs).inputs)
        params = runner.params
        hidden = Ops().embed(params["embed"], tokens)  # [num_tokens, hidden]
        return params["layers"][0], hidden, hidden * 0.5, cos, sin, positions, metadata

    def _op_calls(self, ops, layer, hidden, residual, cos, sin, positions, metadata):
        """op name -> (fn, args, index of the cache among args or None)."""
        config, backend, eps = self.model.config, self.runner.backend, self.model.config.rms_norm_eps
        q, k, v = Ops().qkv_rope(hidden, layer, cos, sin, config=config)
        attn = (hidden.shape[0], config.num_heads * config.head_dim)
        cache = self.runner.kv_cache[0]
        return {
            "add_rms_norm": (lambda x, r, w: ops.rms_norm(x, w, eps, r), (hidden, residual, layer["attn_norm"]), None),
            "qkv_rope": (lambda x, lay, c, s: ops.qkv_rope(x, lay, c, s, config=config), (hidden, layer, cos, sin), None),
            "attention": (lambda q, k, v, cache, pos, md: ops.attention(q, k, v, cache, pos, md, backend=backend),
                          (q, k, v, cache, positions, metadata), 3),
            "self_attention": (lambda x, lay, c, s, cache, pos, md: ops.self_attention(
                x, lay, c, s, cache, pos, md, config=config, backend=backend), (hidden, layer, cos, sin, cache,
                                                                                 positions, metadata), 4),
            "o_proj": (lambda a, w: ops.linear(a, w), (q.reshape(attn), layer["wo"]), None),
            "swiglu_mlp": (lambda x, lay: ops.swiglu_mlp(x, lay), (hidden, layer), None),
            "layer": (lambda lay, x, r, c, s, cache, pos, md: decoder_layer(
                lay, x, r, c, s, cache, pos, md, config=config, backend=backend, ops=ops),
                      (layer, hidden, residual, cos, sin, cache, positions, metadata), 5),
        }

    def _compiled(self, fn, cache_at):
        if not self.ops.jit_step:
            return fn  # the unfused set: its ops are compiled one by one, the layer is Python
        return jax.jit(fn, donate_argnums=() if cache_at is None else (cache_at,))

    def serve(self, requests, progress) -> RunTrace:
        iterations = self.run_config.iterations
        inputs = self._layer_inputs()
        calls = self._op_calls(self.ops, *inputs)
        extra: dict = {"device": jax.default_backend(), "num_tokens": self.num_tokens}
        layer_fn, layer_args, cache_at = calls["layer"]
        jaxpr = jax.make_jaxpr(layer_fn)(*layer_args).jaxpr
        extra["programs_per_layer"] = len(jaxpr.eqns) if not self.ops.jit_step else 1
        extra["pallas_kernels_per_layer"] = _count_pallas_calls(jaxpr)
        extra["xla_fusions_per_layer"] = (_count_fusions(jax.jit(layer_fn).lower(*layer_args).compile().as_text())
                                          if self.ops.name == "xla" else None)
        reference = jax.jit(self._op_calls(Ops(), *inputs)["layer"][0])  # the xla set on the same params
        expected = reference(*layer_args)[0]
        got = self._compiled(layer_fn, None)(*_fresh(layer_args, cache_at))[0]
        extra["layer_max_abs_diff"] = float(np.max(np.abs(np.asarray(got) - np.asarray(expected))))
        bytes_min, bytes_unfused = op_bytes(self.model.config, self.num_tokens, self.context_tokens,
                                            np.dtype(self.model.dtype).itemsize)
        start = time.perf_counter()
        for name in OPS:
            fn, args, at = calls[name]
            us = _median_us(self._compiled(fn, at), _fresh(args, at), at, iterations) if self.timed else None
            extra[f"{name}_us"] = us
            if name in bytes_min:
                extra[f"{name}_bytes"], extra[f"{name}_bytes_unfused"] = bytes_min[name], bytes_unfused[name]
                extra[f"{name}_gb_per_s"] = None if us is None else bytes_min[name] / us / 1e3
        # the runner's whole step (it owns and donates its cache), on the same warm-up and median rule
        extra["step_ms"] = (_median_us(self.runner.run, (self.runner.prepare(self.seqs),), None, iterations) / 1e3
                            if self.timed else None)
        progress(len(requests))
        kv = self.runner.kv_cache_bytes
        return RunTrace([], time.perf_counter() - start, kv, kv, 1.0, 0, simulated=True, extra_metrics=extra)
