"""The FP8 E4M3 paged KV cache (`kv_cache_dtype="fp8_e4m3"`): writes round to E4M3 and saturate at
+-448 instead of overflowing to NaN (the jnp write and the fused QKV kernel's), every paged reader
widens the FP8 cache exactly (its output equals dense attention over the rounded values), and the
engine runs on a cache a quarter of f32's size."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.sampling_params import SamplingParams
from paged_attention.decode_cpu import build_decode_indices, paged_decode_attention_cpu
from paged_attention.decode_kernel import paged_decode_attention, paged_decode_attention_reference
from paged_attention.kv_cache import cache_dtype, write_kv
from paged_attention.prefill_cpu import build_prefill_indices, paged_prefill_attention_cpu
from paged_attention.prefill_kernel import paged_prefill_attention, paged_prefill_attention_reference
from tests.paged_attention.test_paged_kernels import NUM_KV_HEADS, expected_decode, expected_prefill, paged_case

FP8 = jnp.float8_e4m3fn


def test_writes_round_and_saturate():
    cache = (jnp.zeros((1, 2, 4, 4), FP8), jnp.zeros((1, 2, 4, 4), FP8))
    k = jnp.asarray([[[1000.0, -1000.0, 0.3, 1e-4]]])  # [tokens, kv_heads, head_dim]
    k_cache, v_cache = write_kv(cache, k, k * 2, jnp.asarray([5]))
    assert k_cache.dtype == FP8 and not jnp.isnan(k_cache.astype(jnp.float32)).any()
    np.testing.assert_array_equal(np.asarray(k_cache[0, 1, 1], np.float32),
                                  np.asarray(jnp.asarray([448.0, -448.0, 0.3, 1e-4]).astype(FP8), np.float32))
    assert cache_dtype("fp8_e4m3", jnp.float32) == FP8 and cache_dtype("auto", jnp.bfloat16) == jnp.bfloat16


def fp8_case(rng, context_lens, block_size, head_dim):
    """paged_case's K/V rounded to FP8 (NaN in unowned slots stays NaN), and the f32 copy of the
    rounded values the expected outputs are computed from."""
    k_cache, v_cache, tables = paged_case(rng, context_lens, block_size, head_dim)
    k8, v8 = (jnp.asarray(c * 3).astype(FP8) for c in (k_cache, v_cache))  # x3: spread over E4M3's range
    return k8, v8, np.asarray(k8, np.float32), np.asarray(v8, np.float32), tables


def test_decode_readers_widen_the_fp8_cache(rng):
    block_size, head_dim, group = 8, 32, 3
    context_lens = np.array([1, 19, 0, 8], np.int32)
    k8, v8, k32, v32, tables = fp8_case(rng, context_lens, block_size, head_dim)
    q = jnp.asarray(rng.standard_normal((4, NUM_KV_HEADS * group, head_dim)), jnp.float32)
    expected = expected_decode(q, k32, v32, tables, context_lens, block_size)
    args = (q, k8, v8, jnp.asarray(tables), jnp.asarray(context_lens))
    pairs = build_decode_indices(tables, context_lens, k8.shape[1], NUM_KV_HEADS, block_size)
    outputs = {"pallas": paged_decode_attention(*args, interpret=True),
               "reference": paged_decode_attention_reference(*args),
               "cpu": paged_decode_attention_cpu(*args, *map(jnp.asarray, pairs))}
    for name, out in outputs.items():
        assert out.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=2e-5, err_msg=name)


def test_prefill_readers_widen_the_fp8_cache(rng):
    block_size, head_dim, group = 8, 16, 3
    context_lens = np.array([13, 6], np.int32)
    query_start_loc = np.array([0, 5, 11], np.int32)  # 5 new tokens of 13, all 6 of 6
    k8, v8, k32, v32, tables = fp8_case(rng, context_lens, block_size, head_dim)
    q = jnp.asarray(rng.standard_normal((16, NUM_KV_HEADS * group, head_dim)), jnp.float32)  # 5 padding tokens
    expected = expected_prefill(q, k32, v32, tables, context_lens, query_start_loc, block_size)
    args = (q, k8, v8, jnp.asarray(tables), jnp.asarray(context_lens), jnp.asarray(query_start_loc))
    lists = build_prefill_indices(tables, context_lens, query_start_loc, 16, k8.shape[1], NUM_KV_HEADS, block_size)
    outputs = {"pallas": paged_prefill_attention(*args, max_query_len=6, interpret=True),
               "reference": paged_prefill_attention_reference(*args, max_query_len=6),
               "cpu": paged_prefill_attention_cpu(q, k8, v8, *map(jnp.asarray, lists))}
    for name, out in outputs.items():
        np.testing.assert_allclose(np.asarray(out)[:11], expected[:11], atol=2e-5, rtol=2e-5, err_msg=name)


def one_byte_cache_vs_f32(f32_model, model, kernels: str, dtype: str, **settings) -> tuple[float, int, int]:
    """(share of greedy tokens equal to the f32 cache's, f32 cache bytes, `dtype` cache bytes): the
    engine on three prompts, `f32_model` on an f32 cache and `model` on a `dtype` cache (with the
    EngineConfig `settings`)."""
    prompts = [[3, 1, 4, 1, 5] * k for k in (1, 2, 4)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tokens, cache_bytes = [], []
    for run_model, run_dtype, run_settings in ((f32_model, "float32", {}), (model, dtype, settings)):
        engine = Engine(run_model, EngineConfig(num_blocks=64, block_size=4, max_model_len=64, kernels=kernels,
                                                kv_cache_dtype=run_dtype, **run_settings))
        tokens.append([out.outputs[0].token_ids for out in engine.generate(prompts, params, progress=False)])
        cache_bytes.append(sum(k.nbytes + v.nbytes for k, v in engine.runner.kv_cache))
    agree = float(np.mean([a == b for x, y in zip(*tokens) for a, b in zip(x, y)]))
    print(f"greedy tokens equal to the f32 cache's: {agree:.0%}")
    return agree, *cache_bytes


@pytest.mark.parametrize("kernels", ["xla", "pallas"])  # pallas: the fused QKV kernel writes the FP8 cache
def test_engine_on_an_fp8_cache(tiny_model, kernels):
    agree, f32_bytes, fp8_bytes = one_byte_cache_vs_f32(tiny_model, tiny_model, kernels, "fp8_e4m3")
    assert f32_bytes == 4 * fp8_bytes and agree >= 0.6
