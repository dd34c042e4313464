"""Fused Pallas kernels (residual+RMSNorm, QKV+RoPE, SwiGLU, flash attention). Empty until its issue lands."""
