"""The names of the attention backends, JAX-free, so configs can check them before JAX loads
(`models/attention.py` maps each name to its backend object; a test keeps the two equal).

    contiguous       the naive `[batch, kv_heads, max_len, head_dim]` cache (or no cache at all)
    paged            paged KV cache through the Pallas kernels (interpreted when there is no GPU)
    paged_reference  the same cache through the kernels' pure-jnp references
    paged_cpu        the same cache through the XLA-on-CPU paths (`decode_cpu.py`, `prefill_cpu.py`)
"""

PAGED_BACKENDS = ("paged_cpu", "paged", "paged_reference")  # what the paged engine runs on
BACKENDS = ("contiguous", *PAGED_BACKENDS)
