"""Fused operators as Pallas kernels (written for GPU, Triton-lowered; `interpret=True` on CPU), each
beside a pure-jnp `*_reference` of the same signature.

- `rms_norm.py`: residual add + RMSNorm in one pass over each row (`fused_add_rms_norm`)
- `swiglu.py`: gate and up projections as one matmul with SiLU-multiply fused (`fused_swiglu`)
- `flash_attention.py`: causal GQA prefill attention with an online softmax over key tiles
  (FlashAttention-2), queries as the last positions of the keys (a chunk after a computed prefix)
- `qkv_rope.py`: QKV projection + RoPE + the K/V write into paged cache slots (`fused_qkv_rope`)
- `fuse_params.py`: the fused weight layouts (`wqkv`, `w_gate_up`) as a transformation of the params

Imports nothing of this project: `models/` reaches these through its ops seam (`models/ops.py`).
"""
