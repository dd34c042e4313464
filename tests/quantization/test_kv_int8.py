"""The INT8 paged KV cache (`kv_cache_dtype="int8"`, quantization/kv_int8.py): writes round to the
nearest code and saturate at +-127 (the jnp write and the fused QKV kernel's alike), every paged
reader widens the codes exactly, folding the per-head scales into wq / wk / wv / wo leaves the
model's logits unchanged, and the engine runs on calibrated scales with a quarter of f32's cache,
refusing params without them. The same folding at absmax / 448 calibrates an FP8 cache
(`calculate_kv_scales`)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from experiments.quant_calibration import kv_absmax
from kernel_fusion.qkv_rope import fused_qkv_rope, fused_qkv_rope_reference
from models.llama import forward
from paged_attention.decode_cpu import build_decode_indices, paged_decode_attention_cpu
from paged_attention.decode_kernel import paged_decode_attention, paged_decode_attention_reference
from paged_attention.kv_cache import cache_dtype, write_kv
from paged_attention.prefill_kernel import paged_prefill_attention, paged_prefill_attention_reference
from quantization.kv_int8 import fold_kv_scales, folded_code_max
from tests.kernel_fusion.test_qkv_rope import _case, _fused_args
from tests.paged_attention.test_fp8_kv_cache import one_byte_cache_vs_f32
from tests.paged_attention.test_paged_kernels import NUM_KV_HEADS, expected_decode, expected_prefill, paged_case


def test_writes_round_to_the_nearest_code_and_saturate():
    cache = (jnp.zeros((1, 2, 4, 5), jnp.int8), jnp.zeros((1, 2, 4, 5), jnp.int8))
    k = jnp.asarray([[[200.4, -300.0, 2.5, -2.5, 0.49]]])  # [tokens, kv_heads, head_dim]
    k_cache, _ = write_kv(cache, k, k, jnp.asarray([5]))
    np.testing.assert_array_equal(np.asarray(k_cache[0, 1, 1]), [127, -127, 3, -2, 0])
    assert cache_dtype("int8", jnp.float32) == jnp.int8


def test_fused_qkv_kernel_writes_the_same_codes():
    x, weights, cos, sin, _, _, slots, config = _case(13, 64, 4, 2, 16, jnp.float32)
    weights = {name: w * 40.0 for name, w in weights.items()}  # values beyond +-127: saturation too
    cache = jnp.zeros((2, 16, 4, 16), jnp.int8)
    args, kw = _fused_args(x, weights, cos, sin, cache, cache, slots, config)
    _, k_ref, v_ref = fused_qkv_rope_reference(*args, **kw)
    _, k_kernel, v_kernel = fused_qkv_rope(*args, **kw, interpret=True)
    assert k_kernel.dtype == jnp.int8 and int(jnp.abs(k_ref.astype(jnp.int32)).max()) == 127
    # equal codes, except where f32 sums in another order land on the other side of a half
    for a, b in ((k_kernel, k_ref), (v_kernel, v_ref)):
        assert int(jnp.abs(a.astype(jnp.int32) - b.astype(jnp.int32)).max()) <= 1
        assert float(jnp.mean(a == b)) > 0.999


def int8_case(rng, context_lens, block_size, head_dim):
    """paged_case's K/V as int8 codes (unowned slots hold any code), and their f32 copies."""
    k_cache, v_cache, tables = paged_case(rng, context_lens, block_size, head_dim)
    k8, v8 = (jnp.asarray(np.clip(np.nan_to_num(np.round(c * 40)), -127, 127), jnp.int8) for c in (k_cache, v_cache))
    return k8, v8, np.asarray(k8, np.float32), np.asarray(v8, np.float32), tables


def test_paged_readers_widen_the_int8_cache(rng):
    block_size, head_dim, group = 8, 32, 3
    context_lens = np.array([1, 19, 0, 8], np.int32)
    k8, v8, k32, v32, tables = int8_case(rng, context_lens, block_size, head_dim)
    q = jnp.asarray(rng.standard_normal((4, NUM_KV_HEADS * group, head_dim)) / 40, jnp.float32)
    expected = expected_decode(q, k32, v32, tables, context_lens, block_size)
    args = (q, k8, v8, jnp.asarray(tables), jnp.asarray(context_lens))
    pairs = build_decode_indices(tables, context_lens, k8.shape[1], NUM_KV_HEADS, block_size)
    for name, out in {"pallas": paged_decode_attention(*args, interpret=True),
                      "reference": paged_decode_attention_reference(*args),
                      "cpu": paged_decode_attention_cpu(*args, *map(jnp.asarray, pairs)),
                      "cpu-chunked": paged_decode_attention_cpu(*args, *map(jnp.asarray, pairs), dense_max_pages=0)}.items():
        np.testing.assert_allclose(np.asarray(out), expected, atol=1e-3, rtol=1e-5, err_msg=name)
    query_start_loc = np.array([0, 1, 6, 6, 10], np.int32)  # 1, 5, 0 and 4 new tokens
    q = jnp.asarray(rng.standard_normal((12, NUM_KV_HEADS * group, head_dim)) / 40, jnp.float32)
    expected = expected_prefill(q, k32, v32, tables, context_lens, query_start_loc, block_size)
    args = (q, k8, v8, jnp.asarray(tables), jnp.asarray(context_lens), jnp.asarray(query_start_loc))
    for name, out in {"pallas": paged_prefill_attention(*args, max_query_len=5, interpret=True),
                      "reference": paged_prefill_attention_reference(*args, max_query_len=5)}.items():
        np.testing.assert_allclose(np.asarray(out)[:10], expected[:10], atol=1e-3, rtol=1e-5, err_msg=name)


def test_folding_scales_leaves_the_logits_unchanged(tiny_model, rng):
    config = tiny_model.config
    k_absmax, v_absmax = (rng.uniform(0.1, 20.0, (config.num_layers, config.num_kv_heads)) for _ in range(2))
    folded = fold_kv_scales(tiny_model.params, config, k_absmax, v_absmax)
    assert folded_code_max(folded) == 127 and folded_code_max(tiny_model.params) is None
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, (2, 17)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(17), tokens.shape)
    base = forward(tiny_model.params, tokens, positions, config=config)[0]
    ours = forward(folded, tokens, positions, config=config)[0]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(base), atol=1e-4 * float(jnp.abs(base).max()))


@pytest.mark.parametrize("kernels", ["xla", "pallas"])  # pallas: the fused QKV kernel writes the codes
def test_engine_on_an_int8_cache(tiny_model, kernels):
    with pytest.raises(ValueError, match="fold_kv_scales"):
        Engine(tiny_model, EngineConfig(num_blocks=64, block_size=4, max_model_len=64, kv_cache_dtype="int8"))
    calibration = np.random.default_rng(0).integers(3, tiny_model.config.vocab_size, (4, 64))
    folded = dataclasses.replace(tiny_model, params=fold_kv_scales(tiny_model.params, tiny_model.config,
                                                                   *kv_absmax(tiny_model, calibration)))
    agree, f32_bytes, int8_bytes = one_byte_cache_vs_f32(tiny_model, folded, kernels, "int8")
    assert f32_bytes == 4 * int8_bytes and agree >= 0.6

def test_int8_cache_write_lowers_to_triton_for_cuda():
    """The fused kernel's rounding and saturation through Pallas's Triton lowering rules (cross-lowered
    for CUDA on this CPU machine, not run)."""
    import jax

    x, weights, cos, sin, _, _, slots, config = _case(13, 576, 9, 3, 64, jnp.float32)
    cache = jnp.zeros((3, 16, 4, 64), jnp.int8)
    args, kw = _fused_args(x, weights, cos, sin, cache, cache, slots, config)
    fn = jax.jit(lambda *a: fused_qkv_rope(*a, **kw))
    exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args])
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


def test_calibrated_fp8_scales(tiny_model):
    """fold_kv_scales(..., cache_dtype="fp8_e4m3") maps each head's absmax to 448; the engine takes
    those params with calculate_kv_scales and refuses params folded for another code range."""
    config = tiny_model.config
    k_absmax = np.full((config.num_layers, config.num_kv_heads), 8.96)
    fp8 = dataclasses.replace(tiny_model, params=fold_kv_scales(tiny_model.params, config, k_absmax, k_absmax,
                                                                cache_dtype="fp8_e4m3"))
    assert folded_code_max(fp8.params) == 448
    np.testing.assert_allclose(np.asarray(fp8.params["layers"][0]["kv_scales"][:2]), 8.96 / 448, rtol=1e-6)
    small = dict(num_blocks=64, block_size=4, max_model_len=64)
    for params, made in ((tiny_model.params, "carry none"), (fold_kv_scales(tiny_model.params, config, k_absmax,
                                                                            k_absmax), "up to 127")):
        with pytest.raises(ValueError, match=f"EngineConfig.calculate_kv_scales.*{made}"):
            Engine(dataclasses.replace(tiny_model, params=params),
                   EngineConfig(kv_cache_dtype="fp8_e4m3", calculate_kv_scales=True, **small))
    with pytest.raises(ValueError, match="kv_cache_dtype.*up to 448"):
        Engine(fp8, EngineConfig(kv_cache_dtype="int8", **small))
    with pytest.raises(ValueError, match="EngineConfig.calculate_kv_scales.*fp8_e4m3"):
        EngineConfig(calculate_kv_scales=True)
    calibration = np.random.default_rng(0).integers(3, config.vocab_size, (4, 64))
    calibrated = dataclasses.replace(tiny_model, params=fold_kv_scales(
        tiny_model.params, config, *kv_absmax(tiny_model, calibration), cache_dtype="fp8_e4m3"))
    agree, f32_bytes, fp8_bytes = one_byte_cache_vs_f32(tiny_model, calibrated, "xla", "fp8_e4m3",
                                                        calculate_kv_scales=True)
    assert f32_bytes == 4 * fp8_bytes and agree >= 0.6
