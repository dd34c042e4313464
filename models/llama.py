"""The Llama-family decoder as pure functions over a params pytree.

    forward(params, tokens, positions, kv_cache, metadata, *, config, backend, ops) -> (logits, kv_cache)

The model knows nothing of tensor parallelism or quantization (those transform `params` from the
outside), nothing of how its ops are implemented (every op comes from the ops set `ops` names,
`models/ops.py`: fused kernels and quantized weights enter there) and nothing of how the KV cache is
laid out (the `attention` op dispatches to the backend named by `backend`, `models/attention.py`).
`decoder_layer` is public so a pipeline stage can run a slice of the layers. Token arrays may have
any leading shape the backend understands (`[batch, tokens]` for the contiguous cache).

Params pytree (matmul weights stored `[in, out]`, so a projection is `x @ w`):
    {"embed": [vocab, hidden],
     "layers": [{"attn_norm": [hidden], "wq": [hidden, heads*head_dim], "wk": [hidden, kv_heads*head_dim],
                 "wv": [hidden, kv_heads*head_dim], "wo": [heads*head_dim, hidden],
                 "mlp_norm": [hidden], "w_gate": [hidden, inter], "w_up": [hidden, inter],
                 "w_down": [inter, hidden]}, ... one dict per layer],
     "final_norm": [hidden],
     "lm_head": [hidden, vocab]}            # absent when config.tie_word_embeddings
A layer may instead hold `wqkv` [hidden, (heads + 2 kv_heads) * head_dim] and `w_gate_up`
[hidden, 2 inter] (`kernel_fusion.fuse_params`); the ops read either layout.
Layers are a Python list and the forward loops over them unrolled: each layer's cache buffer is then
updated in place under `donate_argnums` (a `lax.scan` carrying the caches copies them every step).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.host_offload import to_device
from models.ops import Ops, get_ops, rope_cos_sin

Params = dict[str, Any]


def decoder_layer(layer: Params, hidden: jax.Array, residual: jax.Array | None, cos: jax.Array,
                  sin: jax.Array, layer_cache, positions: jax.Array, metadata: Any, *, config: ModelConfig,
                  backend: str, ops: Ops) -> tuple[jax.Array, jax.Array, Any]:
    """One pre-norm decoder layer on the (hidden, residual) carry, whose sum is the layer's input
    (residual None for the first layer: hidden is the embedding). Returns (hidden, residual,
    layer_cache) for the next layer; the residual add is left to the next norm, so an ops set can
    fuse it (vLLM's fused add + RMSNorm). hidden, residual: [*lead, hidden_size]."""
    eps = config.rms_norm_eps
    layer = to_device(layer)  # weights offloaded to host memory come in now (models/host_offload.py)
    h, residual = ops.rms_norm(hidden, layer["attn_norm"], eps, residual)
    out, layer_cache = ops.self_attention(h, layer, cos, sin, layer_cache, positions, metadata, config=config,
                                          backend=backend)
    h = ops.linear(out.reshape(*out.shape[:-2], config.num_heads * config.head_dim), layer["wo"])
    h, residual = ops.rms_norm(h, layer["mlp_norm"], eps, residual)
    return ops.swiglu_mlp(h, layer), residual, layer_cache


def forward(params: Params, tokens: jax.Array, positions: jax.Array, kv_cache: list | None = None,
            metadata: Any = None, *, config: ModelConfig, backend: str = "contiguous", ops: str | Ops = "xla",
            logits_indices: jax.Array | None = None, rope: tuple[jax.Array, jax.Array] | None = None
            ) -> tuple[jax.Array, list | None]:
    """Run the decoder.

    tokens, positions: i32[*lead] (e.g. [batch, tokens]). kv_cache: the backend's per-layer caches,
    or None to attend only within `tokens` (no cache). ops: the ops set (`models.ops`), by name or
    instance. logits_indices: optional i32[k] indices into the flattened tokens; when given, logits
    are computed only there (skips the LM head for prompt tokens whose logits nobody reads). rope:
    the positions' (cos, sin) tables f32[*lead, head_dim] when the caller built them (`rope_cos_sin`),
    else computed here. Returns (f32 logits [*lead, vocab] or [k, vocab], kv_cache).
    """
    ops = get_ops(ops)
    hidden, residual = ops.embed(params["embed"], tokens), None  # [*lead, hidden]
    cos, sin = rope if rope is not None else rope_cos_sin(positions, config.head_dim, config.rope_theta)
    new_cache = None if kv_cache is None else []
    for i, layer in enumerate(params["layers"]):
        layer_cache = None if kv_cache is None else kv_cache[i]
        hidden, residual, layer_cache = decoder_layer(layer, hidden, residual, cos, sin, layer_cache, positions,
                                                      metadata, config=config, backend=backend, ops=ops)
        if new_cache is not None:
            new_cache.append(layer_cache)
    return final_logits(params, hidden, residual, config=config, ops=ops, logits_indices=logits_indices), new_cache


def final_logits(params: Params, hidden: jax.Array, residual: jax.Array | None, *, config: ModelConfig, ops: Ops,
                 logits_indices: jax.Array | None = None) -> jax.Array:
    """The last layer's (hidden, residual) carry -> final RMSNorm -> LM head (the tied embedding, or
    `lm_head`): f32 logits [*lead, vocab], or [k, vocab] at `logits_indices` of the flattened tokens."""
    x, _ = ops.rms_norm(hidden, params["final_norm"], config.rms_norm_eps, residual)
    if logits_indices is not None:
        x = x.reshape(-1, x.shape[-1])[logits_indices]  # [k, hidden]
    if config.tie_word_embeddings:
        return ops.logits(x, params["embed"], transposed=True)
    return ops.logits(x, params["lm_head"])


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
