"""Perplexity on a quantized KV cache runs through the engine's paged path: on a float cache that
path gives the plain forward's logits, on an int8 cache (scales folded in) it sees K / V rounding
that the plain forward never does, and the quantization benchmark's `kv_cache_dtype: int8` row
scores, times and compares through it."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.perplexity import paged_window_logits, perplexity
from experiments.quant_calibration import with_calibrated_kv_scales
from experiments.quant_eval import window_logits_fn


def test_the_paged_path_on_a_float_cache_is_the_plain_forward(tiny_model, rng):
    window = rng.integers(3, tiny_model.config.vocab_size, 37).astype(np.int32)  # 3 blocks of 16, the last partial
    dense = np.asarray(window_logits_fn(tiny_model.config, window)(tiny_model.params))
    np.testing.assert_allclose(paged_window_logits(tiny_model, window, "float32"), dense, atol=1e-4, rtol=1e-4)


def test_an_int8_cache_rounds_what_attention_reads(tiny_model, rng):
    folded = with_calibrated_kv_scales(tiny_model, "int8")
    ids = rng.integers(3, tiny_model.config.vocab_size, 130).tolist()
    dense_ppl, scored = perplexity(folded, ids, window=64)
    int8_ppl, int8_scored = perplexity(folded, ids, window=64, kv_cache_dtype="int8")
    assert scored == int8_scored == 2 * 63
    assert int8_ppl != dense_ppl and abs(int8_ppl / dense_ppl - 1) < 0.05  # rounded, and close
    window = np.asarray(ids[:64], np.int32)
    codes = paged_window_logits(folded, window, "int8")
    assert not np.array_equal(codes, paged_window_logits(folded, window, "float32"))
