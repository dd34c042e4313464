"""Bytes each decoder-layer op moves, from shapes alone: the least it must move fused, and what the
unfused sequence of smaller ops moves, every intermediate written to memory and read back.

For T tokens (the step's new tokens), C cached tokens attended over (summed over sequences), hidden
d, query width Q = heads * head_dim, key/value width V = kv_heads * head_dim, intermediate I, and
s bytes per element (the RoPE tables are f32, 2 T head_dim of them):

| op | fused: read + write once | unfused: each smaller op reads its inputs and writes its outputs |
|---|---|---|
| `add_rms_norm` | x, residual, weight in; normed, sum out: 4Td + d | add (3Td), then norm (2Td + d) |
| `qkv_rope` | x, W_qkv in; q, k, v out: Td + d(Q+2V) + T(Q+2V) | three matmuls each reading x (3Td + d(Q+2V) + T(Q+2V)), RoPE on q and k (read, write: 2T(Q+V) + tables) |
| `attention` | q, new k and v in, both written to the cache, C cached K/V read, out written: 2TQ + 4TV + 2CV | the same (one op either way) |
| `self_attention` | x, W_qkv, tables in; k, v straight to the cache; q never leaves until attention: Td + d(Q+2V) + 2TV + 2CV + 2TQ | `qkv_rope` unfused, then `attention` |
| `o_proj` | attention out, W_o in; Td out: TQ + Qd + Td | the same |
| `swiglu_mlp` | x, W_gate_up, W_down in; the activation [T, I] written and read by the down matmul; Td out: Td + 3dI + 2TI + Td | gate and up matmuls (2Td + 2dI + 2TI), SiLU-multiply (3TI), down (TI + dI + Td) |

Weights dominate at decode (T small); activations dominate at prefill, which is where the unfused
round trips cost most.
"""

from __future__ import annotations

from models.config import ModelConfig


def op_bytes(config: ModelConfig, num_tokens: int, context_tokens: int, itemsize: int) -> tuple[dict, dict]:
    """({op: bytes moved fused}, {op: bytes moved unfused}) for one decoder layer (see the module)."""
    t, c, d, i = num_tokens, context_tokens, config.hidden_size, config.intermediate_size
    q, v = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    tables = 2 * t * config.head_dim * 4  # f32 cos and sin, bytes
    qkv_out = t * (q + 2 * v)
    weights_qkv = d * (q + 2 * v)
    attention = 2 * t * q + 4 * t * v + 2 * c * v
    fused = {
        "add_rms_norm": (4 * t * d + d) * itemsize,
        "qkv_rope": (t * d + weights_qkv + qkv_out) * itemsize + tables,
        "attention": attention * itemsize,
        "self_attention": (t * d + weights_qkv + 2 * t * v + 2 * c * v + 2 * t * q) * itemsize + tables,
        "o_proj": (t * q + q * d + t * d) * itemsize,
        "swiglu_mlp": (2 * t * d + 3 * d * i + 2 * t * i) * itemsize,
    }
    qkv_rope_unfused = (3 * t * d + weights_qkv + qkv_out + 2 * t * (q + v)) * itemsize + tables
    unfused = {
        "add_rms_norm": (5 * t * d + d) * itemsize,
        "qkv_rope": qkv_rope_unfused,
        "attention": fused["attention"],
        "self_attention": qkv_rope_unfused + fused["attention"],
        "o_proj": fused["o_proj"],
        "swiglu_mlp": (2 * t * d + 2 * d * i + 2 * t * i + 3 * t * i + t * i + d * i + t * d) * itemsize,
    }
    return fused, unfused
