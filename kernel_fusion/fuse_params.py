"""Fused weight layouts as a transformation of the model's params (the model is not edited).

    fused = fuse_params(params)     # per layer: wqkv = [wq | wk | wv], w_gate_up = [w_gate | w_up]

A decoder layer's Q, K and V projections read the same input, as do the MLP's gate and up
projections; concatenating their weights column-wise turns 7 matmuls a layer into 4 (vLLM's
`QKVParallelLinear` and `MergedColumnParallelLinear`, FasterTransformer's fused QKV GEMM). At
decode, where each matmul is one pass over its weight at batch 1, fewer and larger matmuls cost
fewer kernel launches (GPU) or fewer thread-pool dispatches (XLA on CPU), and the fused SwiGLU
kernel (`swiglu.py`) reads gate and up tiles of the one weight side by side.

The ops seam (`models/ops.py`) reads either layout: a layer with `wqkv` projects once and splits,
a layer with `w_gate_up` likewise; `unfuse_params` is the inverse (tests use it to show the
transformation loses nothing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


def fuse_params(params: dict) -> dict:
    """A copy of `params` whose layers hold `wqkv` and `w_gate_up` instead of their parts (columns
    concatenated in the order of `FUSED`); other leaves are shared, not copied. Weights must be
    plain arrays: quantize after fusing (a quantized leaf's scales follow its own columns)."""
    layers = []
    for i, layer in enumerate(params["layers"]):
        layer = dict(layer)
        for fused, parts in FUSED.items():
            missing = [p for p in parts if p not in layer]
            if missing:
                raise ValueError(f"layers[{i}] has no {missing} to fuse into {fused!r} (already fused?)")
            weights = [layer.pop(p) for p in parts]
            if not all(isinstance(w, jax.Array) for w in weights):
                raise ValueError(f"layers[{i}].{parts}: fuse plain arrays, then quantize; got "
                                 f"{[type(w).__name__ for w in weights]}")
            layer[fused] = jnp.concatenate(weights, axis=1)  # [hidden, sum of the parts' columns]
        layers.append(layer)
    return {**params, "layers": layers}


def unfuse_params(params: dict, *, num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
    """The inverse of `fuse_params`: each fused weight split back into its parts."""
    layers = []
    for layer in params["layers"]:
        layer = dict(layer)
        q_cols, kv_cols = num_heads * head_dim, num_kv_heads * head_dim
        wqkv = layer.pop("wqkv")
        layer["wq"], layer["wk"], layer["wv"] = jnp.split(wqkv, [q_cols, q_cols + kv_cols], axis=1)
        layer["w_gate"], layer["w_up"] = jnp.split(layer.pop("w_gate_up"), 2, axis=1)
        layers.append(layer)
    return {**params, "layers": layers}


def pad_intermediate(params: dict, multiple: int) -> dict:
    """Fused params whose intermediate size is rounded up to a multiple of `multiple` (a tiled
    kernel's column tile): zero columns after each half of `w_gate_up` and zero rows under `w_down`.
    A padded unit computes silu(0) * 0 = 0 and adds nothing, so the model's output is unchanged."""
    layers = []
    for i, layer in enumerate(params["layers"]):
        if "w_gate_up" not in layer:
            raise ValueError(f"layers[{i}] has no w_gate_up: pad_intermediate runs on fuse_params' output")
        inter = layer["w_gate_up"].shape[1] // 2
        extra = -inter % multiple
        if extra:
            gate, up = jnp.split(layer["w_gate_up"], 2, axis=1)
            pad = ((0, 0), (0, extra))
            layer = {**layer, "w_gate_up": jnp.concatenate([jnp.pad(gate, pad), jnp.pad(up, pad)], axis=1),
                     "w_down": jnp.pad(layer["w_down"], ((0, extra), (0, 0)))}
        layers.append(layer)
    return {**params, "layers": layers}
