"""The Llama-family decoder as pure functions over a params pytree.

    forward(params, tokens, positions, kv_cache, metadata, *, config, backend) -> (logits, kv_cache)

The model knows nothing of tensor parallelism or quantization (those transform `params` from the
outside) and nothing of how the KV cache is laid out: `models.attention` dispatches each layer's
attention to the backend named by `backend`. Token arrays may have any leading shape the backend
understands (`[batch, tokens]` for the contiguous cache).

Params pytree (matmul weights stored `[in, out]`, so a projection is `x @ w`):
    {"embed": [vocab, hidden],
     "layers": [{"attn_norm": [hidden], "wq": [hidden, heads*head_dim], "wk": [hidden, kv_heads*head_dim],
                 "wv": [hidden, kv_heads*head_dim], "wo": [heads*head_dim, hidden],
                 "mlp_norm": [hidden], "w_gate": [hidden, inter], "w_up": [hidden, inter],
                 "w_down": [inter, hidden]}, ... one dict per layer],
     "final_norm": [hidden],
     "lm_head": [hidden, vocab]}            # absent when config.tie_word_embeddings
Layers are a Python list and the forward loops over them unrolled: each layer's cache buffer is then
updated in place under `donate_argnums` (a `lax.scan` carrying the caches copies them every step).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from models.attention import attend
from models.config import ModelConfig

Params = dict[str, Any]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in f32, cast back to x's dtype, then scaled (HF Llama order)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables f32[*positions.shape, head_dim] for the rotate-half RoPE convention."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # f32[..., head_dim/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [..., heads, head_dim] by the tables [..., head_dim] (HF `rotate_half` layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[..., None, :].astype(x.dtype), sin[..., None, :].astype(x.dtype)
    return x * cos + rotated * sin


def mlp(x: jax.Array, layer: Params) -> jax.Array:
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
    return (jax.nn.silu(x @ layer["w_gate"]) * (x @ layer["w_up"])) @ layer["w_down"]


def attention_block(x, layer, cos, sin, layer_cache, positions, metadata, *, config, backend):
    """Project to q/k/v, apply RoPE, attend through the backend, project out."""
    lead = x.shape[:-1]
    q = (x @ layer["wq"]).reshape(*lead, config.num_heads, config.head_dim)
    k = (x @ layer["wk"]).reshape(*lead, config.num_kv_heads, config.head_dim)
    v = (x @ layer["wv"]).reshape(*lead, config.num_kv_heads, config.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out, layer_cache = attend(backend, q, k, v, layer_cache, positions, metadata)
    return out.reshape(*lead, config.num_heads * config.head_dim) @ layer["wo"], layer_cache


def forward(params: Params, tokens: jax.Array, positions: jax.Array, kv_cache: list | None = None,
            metadata: Any = None, *, config: ModelConfig, backend: str = "contiguous",
            logits_indices: jax.Array | None = None) -> tuple[jax.Array, list | None]:
    """Run the decoder.

    tokens, positions: i32[*lead] (e.g. [batch, tokens]). kv_cache: the backend's per-layer caches,
    or None to attend only within `tokens` (no cache). logits_indices: optional i32[k] indices into
    the flattened tokens; when given, logits are computed only there (skips the LM head for prompt
    tokens whose logits nobody reads). Returns (f32 logits [*lead, vocab] or [k, vocab], kv_cache).
    """
    x = params["embed"][tokens]  # [*lead, hidden]
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta)
    new_cache = None if kv_cache is None else []
    for i, layer in enumerate(params["layers"]):
        layer_cache = None if kv_cache is None else kv_cache[i]
        h = rms_norm(x, layer["attn_norm"], config.rms_norm_eps)
        h, layer_cache = attention_block(h, layer, cos, sin, layer_cache, positions, metadata,
                                         config=config, backend=backend)
        x = x + h
        x = x + mlp(rms_norm(x, layer["mlp_norm"], config.rms_norm_eps), layer)
        if new_cache is not None:
            new_cache.append(layer_cache)
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    if logits_indices is not None:
        x = x.reshape(-1, x.shape[-1])[logits_indices]  # [k, hidden]
    head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    logits = jnp.matmul(x, head, preferred_element_type=jnp.float32)
    return logits, new_cache


def init_params(config: ModelConfig, seed: int = 0, dtype: str = "float32", std: float = 0.02) -> Params:
    """Seeded random params (normal(0, std) weights, ones for norms), for tests and benchmarks."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = {"wq": (d, config.num_heads * hd), "wk": (d, config.num_kv_heads * hd),
              "wv": (d, config.num_kv_heads * hd), "wo": (config.num_heads * hd, d),
              "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}
    keys = iter(jax.random.split(jax.random.key(seed), 2 + config.num_layers * len(shapes)))

    def normal(shape):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    params: Params = {"embed": normal((config.vocab_size, d)), "layers": [],
                      "final_norm": jnp.ones((d,), dtype)}
    for _ in range(config.num_layers):
        layer = {name: normal(shape) for name, shape in shapes.items()}
        layer["attn_norm"] = jnp.ones((d,), dtype)
        layer["mlp_norm"] = jnp.ones((d,), dtype)
        params["layers"].append(layer)
    lm_head = normal((d, config.vocab_size))
    if not config.tie_word_embeddings:
        params["lm_head"] = lm_head
    return params
