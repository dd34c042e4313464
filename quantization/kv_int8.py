"""An INT8 KV cache whose scales live in the weights, so no kernel reads a scale.

TensorRT-LLM's INT8 KV cache keeps one static scale per layer from calibration and multiplies it
in inside its attention kernels. Attention is linear in K and V in a way that lets the scales move
into the projections instead: with one scale per layer and KV head, s_k[h] and s_v[h],

    k' = x @ (wk[:, h] / s_k[h])          the cache stores round(k') in int8 (RoPE is a rotation: linear)
    q' = x @ (wq[:, i] * s_k[g(i)])       q' . k' = q . k        (g(i): the KV head of query head i)
    v' = x @ (wv[:, h] / s_v[h])          the cache stores round(v') in int8
    wo'[i rows] = wo[i rows] * s_v[g(i)]  (sum_t p_t v'_t) @ wo' = (sum_t p_t v_t) @ wo

so the model, the attention backends and the kernels run unchanged on an `int8` cache: a write
rounds to the nearest code and saturates at +-127, every reader widens the codes to f32 as it does
FP8. `fold_kv_scales` is that params transformation (exact in real arithmetic; tested equal logits
on a float cache); the scales are absmax / 127 of K (after RoPE) and V per layer and KV head over
calibration text (`experiments/quant_calibration.kv_absmax`), and the folded layers keep them as
`kv_scales` f32[3, kv_heads] (s_k, s_v, and the largest code they were made for), which the engine
checks before it accepts `kv_cache_dtype: int8`.

The same folding gives an FP8 cache calibrated scales (vLLM's `k_scale` / `v_scale`,
`calculate_kv_scales`): absmax / 448 puts each head's largest calibrated K / V at E4M3's largest
finite value instead of storing raw values, which saturate past 448 and lose precision below 2^-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INT8_LIMIT = 127.0  # codes in [-127, 127]: symmetric, as TensorRT-LLM's INT8 KV cache
CODE_MAX = {"int8": INT8_LIMIT, "fp8_e4m3": 448.0}  # a scaled cache's largest code: its calibrated absmax maps there


def to_cache_dtype(x: jax.Array, dtype) -> jax.Array:
    """x cast for storing in a cache of `dtype`: an FP8 cache saturates at its largest finite value
    (a plain cast would give NaN), an int8 cache rounds to the nearest code (halves up) and
    saturates at +-127, a float cache casts."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        return jnp.clip(jnp.floor(x.astype(jnp.float32) + 0.5), -INT8_LIMIT, INT8_LIMIT).astype(dtype)
    if jnp.finfo(dtype).bits == 8:
        limit = float(jnp.finfo(dtype).max)
        x = jnp.clip(x, -limit, limit)
    return x.astype(dtype)


def folded_code_max(params: dict) -> float | None:
    """The cache code the params' folded K / V scales map a calibrated absmax to (127 for int8, 448
    for FP8), or None when `fold_kv_scales` did not make them."""
    if not all("kv_scales" in layer for layer in params["layers"]):
        return None
    return float(params["layers"][0]["kv_scales"][2, 0])


def check_folded_scales(params: dict, kv_cache_dtype: str, field: str) -> None:
    """Raise, naming `field`, unless the params carry K / V scales folded for a `kv_cache_dtype` cache."""
    want, got = CODE_MAX[kv_cache_dtype], folded_code_max(params)
    if got != want:
        made = "carry none" if got is None else f"were folded for codes up to {got:g}"
        raise ValueError(f"{field}: a {kv_cache_dtype} cache stores K / V in the units of calibrated per-head "
                         f"scales folded into the weights (absmax -> {want:g}), and these params {made}: fold "
                         f"them first (quantization.kv_int8.fold_kv_scales(..., cache_dtype={kv_cache_dtype!r}); "
                         "the harness does it for its runs)")


def fold_kv_scales(params: dict, config, k_absmax: np.ndarray, v_absmax: np.ndarray,
                   cache_dtype: str = "int8") -> dict:
    """params with each layer's K / V scales (absmax / CODE_MAX[cache_dtype] per KV head; k_absmax,
    v_absmax f32[num_layers, kv_heads]) folded into wq, wk, wv and wo (module docstring). Float,
    unfused projections only (fold before fusing or quantizing the weights)."""
    if cache_dtype not in CODE_MAX:
        raise ValueError(f"fold_kv_scales: cache_dtype must be one of {list(CODE_MAX)}, got {cache_dtype!r}")
    code_max = CODE_MAX[cache_dtype]
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    group = heads // kv_heads
    folded = dict(params, layers=[])
    for i, layer in enumerate(params["layers"]):
        for name in ("wq", "wk", "wv", "wo"):
            if name not in layer or not isinstance(layer[name], jax.Array | np.ndarray):
                raise ValueError(f"fold_kv_scales needs float, unfused projections; layer {i} has "
                                 f"{name}={type(layer.get(name)).__name__} (fold before fuse_params / quantize_params)")
        s_k = jnp.maximum(jnp.asarray(k_absmax[i], jnp.float32), 1e-6) / code_max  # f32[kv_heads]
        s_v = jnp.maximum(jnp.asarray(v_absmax[i], jnp.float32), 1e-6) / code_max
        per_kv_col = lambda s: jnp.repeat(s, head_dim)  # f32[kv_heads * head_dim]
        per_q_col = lambda s: jnp.repeat(jnp.repeat(s, group), head_dim)  # f32[heads * head_dim]
        dtype = layer["wq"].dtype
        folded["layers"].append(dict(
            layer,
            wq=(layer["wq"] * per_q_col(s_k)).astype(dtype),
            wk=(layer["wk"] / per_kv_col(s_k)).astype(dtype),
            wv=(layer["wv"] / per_kv_col(s_v)).astype(dtype),
            wo=(layer["wo"] * per_q_col(s_v)[:, None]).astype(dtype),
            kv_scales=jnp.stack([s_k, s_v, jnp.full_like(s_k, code_max)])))
    return folded
