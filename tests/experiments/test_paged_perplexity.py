"""Perplexity on a quantized KV cache runs through the engine's paged path: on a float cache that
path gives the plain forward's logits, on an int8 cache (scales folded in) it sees K / V rounding
that the plain forward never does; bad cache settings fail before any work; and the quantization
benchmark's `kv_cache_dtype: int8` row quantizes the folded weights and scores through that path
against the unfolded model."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.config import QuantEvalRunConfig
from experiments.perplexity import paged_window_logits, perplexity
from experiments.quant_calibration import with_calibrated_kv_scales
from experiments.quant_eval import QuantEvalEngine, window_logits_fn
from quantization.w8a8 import W8A8Tensor


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


def test_bad_cache_settings_name_the_field(tiny_model):
    window = np.arange(3, 20, dtype=np.int32)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of .*'int8'.*got 'int4'"):
        paged_window_logits(tiny_model, window, "int4")
    with pytest.raises(ValueError, match="kv_cache_dtype: a int8 cache .* carry none"):
        paged_window_logits(tiny_model, window, "int8")  # no scales folded in: raw K / V would clip at 127


def test_the_benchmark_row_quantizes_folded_weights_and_scores_on_the_int8_cache(tiny_model, rng):
    run_config = QuantEvalRunConfig(name="w8a8-int8-kv", engine="quant_eval", quantization="w8a8",
                                    kv_cache_dtype="int8", calibration_windows=2)
    engine = QuantEvalEngine(tiny_model, run_config, [])
    assert engine.base is tiny_model and "kv_scales" not in tiny_model.params["layers"][0]
    layer = engine.model.params["layers"][0]
    assert "kv_scales" in layer and isinstance(layer["wk"], W8A8Tensor)
    window = rng.integers(3, tiny_model.config.vocab_size, 40).astype(np.int32)
    errors = engine._logit_errors(window)
    folded_w8a8 = QuantEvalEngine(tiny_model, run_config.model_copy(update={"kv_cache_dtype": "auto"}), [])
    assert errors != folded_w8a8._logit_errors(window)  # the int8 cache's rounding shows in the errors
    assert 0 < errors["logit_mean_abs_err"] < 0.1
