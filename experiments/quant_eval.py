"""The quantization benchmark (`engine: quant_eval`): one scheme applied to the experiment's model,
measured for size, accuracy and speed side by side.

- size: `bits_per_weight` over the quantized projections (codes plus scales and zero points) and
  `model_bytes` of the whole params tree as stored (norms stay in float, and so does the embedding
  except in the 4-bit schemes, which keep the tied table as Q8_0 blocks);
- accuracy: `perplexity` on gensim's lee_background.cor (the same `perplexity_windows` windows of
  `window` tokens for every scheme, llama.cpp's `perplexity` rule); `prompt_perplexity` on as many
  windows of held-out ShareGPT prompt text (the tokens after the calibration windows: the
  calibration domain, never calibrated on); and the logits of the first lee window against the
  unquantized model's: max / mean absolute error, top-1 agreement;
- calibration (SmoothQuant smoothing, static activation scales, GPTQ / AWQ Hessians):
  `calibration_windows` windows of 256 tokens of ShareGPT prompts through the unquantized model
  (`quant_calibration.py`);
- speed (weight-only and W8A8 schemes and `none`; the model runs on their leaves): decode
  tokens/s at batch 1 and 64 (one step, 256-token contexts, pages scattered) and prompt tokens/s
  (one `prompt_len` prefill step), medians of `iterations` steps after two warm-up steps; and each
  as a `*_speedup` over the unquantized model, whose same step is timed in the same run,
  alternating step by step with ours (a 2-core machine drifts between runs minutes apart by more
  than the differences measured here; alternation gives both medians the same machine). Block
  formats are rounded through and dequantized (`quantization/ggml_params.py`): the model computes
  with exactly llama.cpp's weights, but not on the blocks, so they report no speed.
- `kv_cache_dtype: int8` (TensorRT-LLM's SmoothQuant + INT8 KV cache): calibrated per-head K / V
  scales are folded into the float weights before the scheme quantizes them (and before its own
  calibration), the speed steps run on an int8 paged cache, and perplexities and logit errors come
  from the paged path, since only there are K and V rounded (`experiments/perplexity.py`). The
  reference stays the unquantized model on its float cache.
A model without a tokenizer (the `tiny` smoke model) scores the text's bytes as token ids.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import models
from continuous_batching.request import Sequence
from experiments.datasets import lee_background_text
from experiments.decode_step import scattered_runner
from experiments.perplexity import paged_window_logits, perplexity
from experiments.quant_calibration import (CALIBRATION_WINDOW, activation_stats, calibration_windows, encode,
                                           held_out_prompt_ids, with_calibrated_kv_scales)
from experiments.roofline import paired_median_seconds
from experiments.trace import RunTrace
from models.llama import forward
from quantization.ggml_params import blocks_as_tensors, round_through_blocks
from quantization.scheme_names import BLOCK_FORMAT_NAMES, CALIBRATED_SCHEMES, HESSIAN_SCHEMES
from quantization.schemes import PROJECTIONS, quantize_params

DECODE_BATCHES = (1, 64)


def text_token_ids(model: models.Model) -> list[int]:
    return encode(model, lee_background_text())


def tree_bytes(tree) -> int:
    """Bytes of every array leaf (a QuantizedTensor's codes, scales and zeros included)."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


def projection_bits(params: dict) -> float:
    """Stored bits per weight over the layers' projection matrices."""
    leaves = [layer[key] for layer in params["layers"] for key in PROJECTIONS if key in layer]
    return 8 * tree_bytes(leaves) / sum(int(np.prod(leaf.shape)) for leaf in leaves)


def window_logits_fn(config, window: np.ndarray):
    """params -> f32[window, vocab]: the model's logits over one token window, jitted."""
    tokens = jnp.asarray(window[None])
    positions = jnp.arange(len(window))[None]
    return jax.jit(lambda params: forward(params, tokens, positions, config=config)[0][0])


def logit_errors(base, ours) -> dict:
    """Max / mean |logit difference| and top-1 agreement of `ours` vs `base` (f32[tokens, vocab])."""
    base, ours = jnp.asarray(base), jnp.asarray(ours)
    diff = jnp.abs(ours - base)
    return {"logit_max_abs_err": float(diff.max()), "logit_mean_abs_err": float(diff.mean()),
            "top1_agreement": float((ours.argmax(-1) == base.argmax(-1)).mean())}


class QuantEvalEngine:
    times_itself = True  # warms up and times each measurement inside serve

    def __init__(self, model: models.Model, run_config, requests):
        del requests  # the text and the shapes come from the run config
        self.run_config, self.base = run_config, model
        scheme, self.kv_cache_dtype = run_config.quantization, run_config.kv_cache_dtype
        if self.kv_cache_dtype != "auto":  # the scheme quantizes the folded weights
            model = with_calibrated_kv_scales(model, self.kv_cache_dtype, run_config.calibration_windows)
        kept = blocks_as_tensors(model.params, scheme) if scheme in BLOCK_FORMAT_NAMES else None
        if scheme in BLOCK_FORMAT_NAMES and kept is None:  # rounded through the blocks, run dequantized
            params, blocks = round_through_blocks(model.params, scheme)
            self.model = dataclasses.replace(model, params=params)
            float_bytes = tree_bytes(params) - tree_bytes([layer[k] for layer in params["layers"]
                                                           for k in PROJECTIONS if k in layer])
            self.bits_per_weight = 8 * blocks["bytes"] / blocks["weights"]
            self.model_bytes = float_bytes + blocks["bytes"]
            self.formats = dict(blocks["formats"])
        else:
            calibration = None
            if scheme in CALIBRATED_SCHEMES:  # ShareGPT prompts through the unquantized model
                calibration = activation_stats(model, calibration_windows(model, run_config.calibration_windows,
                                                                          CALIBRATION_WINDOW),
                                               hessian=scheme in HESSIAN_SCHEMES)
            params = kept if kept is not None else quantize_params(model.params, scheme, calibration)
            self.model = dataclasses.replace(model, params=params)
            self.bits_per_weight = projection_bits(self.model.params)
            self.model_bytes = tree_bytes(self.model.params)
            self.formats = None if kept is None else {scheme: sum(
                k in layer for layer in params["layers"] for k in PROJECTIONS)}
        self.timed = scheme not in BLOCK_FORMAT_NAMES or kept is not None

    def warmup(self) -> None:
        pass  # each measurement warms itself up

    def _logit_errors(self, window: np.ndarray) -> dict:
        run = window_logits_fn(self.base.config, window)
        ours = (run(self.model.params) if self.kv_cache_dtype == "auto"
                else paged_window_logits(self.model, window, self.kv_cache_dtype))
        return logit_errors(run(self.base.params), ours)

    def _step_seconds(self, lens: list[int], new_tokens: list[list[int]]) -> tuple[float, float]:
        """(ours, the unquantized model's): median seconds of one model step over these sequences,
        both timed in turn, step by step, after two warm-up steps each."""
        steps = []
        for model, kv_cache_dtype in ((self.model, self.kv_cache_dtype), (self.base, "auto")):
            runner, tables = scattered_runner(model, lens, np.random.default_rng(0), "paged_cpu",
                                              kv_cache_dtype=kv_cache_dtype)
            seqs = [Sequence.in_cache(t, n, new) for t, n, new in zip(tables, lens, new_tokens)]
            steps.append(functools.partial(runner.step, seqs))
        ours, base = paired_median_seconds(steps, self.run_config.iterations, warmups=2)  # compile, warm caches
        return ours, base

    def _speed(self, extra: dict, name: str, tokens: int, lens: list[int], new_tokens: list[list[int]]) -> None:
        """extra[name + "_tokens_per_s"] and extra[name + "_speedup"] (ours over the unquantized model's)."""
        ours, base = self._step_seconds(lens, new_tokens) if self.timed else (None, None)
        extra[f"{name}_tokens_per_s"] = None if ours is None else tokens / ours
        extra[f"{name}_speedup"] = None if ours is None else base / ours

    def serve(self, requests, progress) -> RunTrace:
        rc = self.run_config
        start = time.perf_counter()
        ids = np.asarray(text_token_ids(self.model), np.int32)
        score = functools.partial(perplexity, self.model, window=rc.window, max_windows=rc.perplexity_windows,
                                  kv_cache_dtype=self.kv_cache_dtype)
        ppl, scored = score(ids.tolist())
        chat_ppl, _ = score(held_out_prompt_ids(self.model, rc.calibration_windows * CALIBRATION_WINDOW,
                                                rc.window * rc.perplexity_windows))
        extra = {"bits_per_weight": self.bits_per_weight, "model_bytes": self.model_bytes, "perplexity": ppl,
                 "perplexity_tokens": scored, "prompt_perplexity": chat_ppl, **self._logit_errors(ids[:rc.window])}
        for batch in DECODE_BATCHES:
            self._speed(extra, f"decode_b{batch}", batch, [rc.context_len] * batch, [[5]] * batch)
        self._speed(extra, "prompt", rc.prompt_len, [rc.prompt_len], [list(range(1, rc.prompt_len + 1))])
        extra["block_formats_used"] = None if self.formats is None else ", ".join(
            f"{name} x{count}" for name, count in sorted(self.formats.items()))
        progress(len(requests))
        return RunTrace([], time.perf_counter() - start, 0, 0, 1.0, 0, simulated=True, extra_metrics=extra)
