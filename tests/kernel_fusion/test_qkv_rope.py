"""Fused QKV projection + RoPE + paged cache write: the interpreted Pallas kernel and its reference
against the model's unfused sequence (`models.ops.Ops.qkv_rope` over the separate projections, then
`paged_attention.kv_cache.write_kv`), the CUDA (Triton) lowering, and input validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_fusion.qkv_rope import fused_qkv_rope, fused_qkv_rope_reference
from models.config import ModelConfig
from models.ops import Ops, rope_cos_sin
from paged_attention.kv_cache import write_kv

# relative to the largest magnitude: f32 differs by summation order, bf16 by where results are
# rounded (the unfused op rounds each projection before rotating, the fused one only its outputs)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _case(tokens, hidden, heads, kv_heads, head_dim, dtype, *, num_blocks=16, block_size=4, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (tokens, hidden), jnp.float32).astype(dtype)
    weights = {name: (jax.random.normal(k, (hidden, n * head_dim), jnp.float32) / hidden ** 0.5).astype(dtype)
               for name, k, n in (("wq", keys[1], heads), ("wk", keys[2], kv_heads), ("wv", keys[3], kv_heads))}
    positions = jax.random.randint(keys[4], (tokens,), 0, 500)
    cos, sin = rope_cos_sin(positions, head_dim, 10000.0)
    # distinct slots in a shuffled pool, one token a padding token (-1); the cache starts non-zero
    slots = np.array(jax.random.permutation(keys[5], num_blocks * block_size)[:tokens], np.int32)
    if tokens > 1:
        slots[tokens // 2] = -1
    cache_shape = (kv_heads, num_blocks, block_size, head_dim)
    k_cache = jnp.full(cache_shape, 0.5, dtype)
    v_cache = jnp.full(cache_shape, -0.5, dtype)
    config = ModelConfig(name="case", vocab_size=8, hidden_size=hidden, intermediate_size=16, num_layers=1, num_heads=heads,
                         num_kv_heads=kv_heads, head_dim=head_dim)
    return x, weights, cos, sin, k_cache, v_cache, jnp.asarray(slots), config


def _unfused(x, weights, cos, sin, k_cache, v_cache, slots, config):
    q, k, v = Ops().qkv_rope(x, weights, cos, sin, config=config)
    return (q, *write_kv((k_cache, v_cache), k, v, slots))


def _fused_args(x, weights, cos, sin, k_cache, v_cache, slots, config):
    w_qkv = jnp.concatenate([weights["wq"], weights["wk"], weights["wv"]], axis=1)
    return (x, w_qkv, cos, sin, k_cache, v_cache, slots), {"num_heads": config.num_heads,
                                                            "num_kv_heads": config.num_kv_heads}


@pytest.mark.parametrize("tokens, hidden, heads, kv_heads, head_dim", [
    (13, 576, 9, 3, 64),   # SmolLM2's shapes, a prime token count, GQA ratio 3
    (31, 64, 3, 3, 64),    # GQA ratio 1, two row tiles
    (7, 48, 4, 2, 14),     # the test model's narrow heads (half-head tiles padded and masked)
    (1, 128, 2, 1, 32),    # one decode token
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_and_reference_match_the_unfused_ops(tokens, hidden, heads, kv_heads, head_dim, dtype):
    case = _case(tokens, hidden, heads, kv_heads, head_dim, dtype)
    expected = [np.asarray(a, np.float32) for a in _unfused(*case)]
    args, kw = _fused_args(*case)
    for fn, extra in ((fused_qkv_rope_reference, {}), (fused_qkv_rope, {"interpret": True})):
        got = fn(*args, **kw, **extra)
        for name, a, b in zip(("q", "k_cache", "v_cache"), got, expected):
            assert a.shape == b.shape and a.dtype == dtype, name
            np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=TOL[dtype] * np.abs(b).max(), rtol=0,
                                       err_msg=f"{fn.__name__}: {name}")


def test_padding_tokens_and_untouched_slots_keep_the_cache():
    x, weights, cos, sin, k_cache, v_cache, slots, config = _case(9, 64, 2, 1, 32, jnp.float32)
    args, kw = _fused_args(x, weights, cos, sin, k_cache, v_cache, jnp.full_like(slots, -1), config)
    _, k_new, v_new = fused_qkv_rope(*args, **kw, interpret=True)
    np.testing.assert_array_equal(k_new, k_cache)
    np.testing.assert_array_equal(v_new, v_cache)
    args, kw = _fused_args(x, weights, cos, sin, k_cache, v_cache, slots, config)
    _, k_new, _ = fused_qkv_rope(*args, **kw, interpret=True)
    written = np.zeros(k_cache.shape[1] * k_cache.shape[2], bool)
    written[np.asarray(slots)[np.asarray(slots) >= 0]] = True
    k_flat = np.asarray(k_new).reshape(1, -1, 32)
    assert np.all(k_flat[:, ~written] == 0.5) and not np.any(k_flat[:, written] == 0.5)


@pytest.mark.parametrize("head_dim", [64, 14])
def test_lowers_to_triton_for_cuda(head_dim):
    """Cross-lowering for CUDA on this CPU machine runs Pallas's Triton lowering rules (the gathers,
    masked loads and the scatter store among them), not Triton's own compiler."""
    case = _case(13, 576, 9, 3, head_dim, jnp.bfloat16)
    args, kw = _fused_args(*case)
    fn = jax.jit(lambda *a: fused_qkv_rope(*a, **kw))
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*specs)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


@pytest.mark.parametrize("fn", [fused_qkv_rope, fused_qkv_rope_reference])
@pytest.mark.parametrize("change, match", [
    ({"x": jnp.zeros((2, 3, 64))}, r"x must be \[tokens, hidden\]"),
    ({"w_qkv": jnp.zeros((64, 100))}, r"w_qkv must be \[hidden, \(num_heads \+ 2 num_kv_heads\) \* head_dim\] = \(64, 128\)"),
    ({"cos": jnp.zeros((3, 32))}, r"cos must be \[tokens, head_dim\] = \(4, 32\)"),
    ({"slot_mapping": jnp.zeros((5,), jnp.int32)}, r"slot_mapping must be \[tokens\] = \(4,\)"),
    ({"v_cache": jnp.zeros((1, 8, 4, 16))}, "k_cache and v_cache must both be"),
    ({"k_cache": jnp.zeros((2, 8, 4, 32)), "v_cache": jnp.zeros((2, 8, 4, 32))}, "k_cache has 2 kv heads, num_kv_heads is 1"),
])
def test_bad_shapes_name_the_argument(fn, change, match):
    args = {"x": jnp.zeros((4, 64)), "w_qkv": jnp.zeros((64, 128)), "cos": jnp.zeros((4, 32)),
            "sin": jnp.zeros((4, 32)), "k_cache": jnp.zeros((1, 8, 4, 32)), "v_cache": jnp.zeros((1, 8, 4, 32)),
            "slot_mapping": jnp.zeros((4,), jnp.int32), **change}
    with pytest.raises(ValueError, match=match):
        fn(**args, num_heads=2, num_kv_heads=1)


def test_block_rows_must_be_a_power_of_two_of_at_least_16():
    args, kw = _fused_args(*_case(4, 64, 2, 1, 32, jnp.float32))
    with pytest.raises(ValueError, match="block_rows must be a power of two >= 16"):
        fused_qkv_rope(*args, **kw, interpret=True, block_rows=24)
