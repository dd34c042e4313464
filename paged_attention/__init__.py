"""KV-cache layouts and attention over them.

- `contiguous.py`: the naive cache, `[batch, kv_heads, max_len, head_dim]` per layer, the baseline.
- `kv_cache.py`: the paged cache (a pool of fixed-size blocks), slot writes, block copies and swaps.
- `block_manager.py`: host-side block tables, reference counts, copy-on-write and prefix caching.
- `metadata.py`: the device arrays one model step reads (slot mapping, block tables, lengths).
- `decode_kernel.py`, `prefill_kernel.py`: Pallas paged-attention kernels (GPU; `interpret=True` on
  CPU) with their dense `*_reference` twins.
- `decode_cpu.py`, `prefill_cpu.py`: the same attention written for XLA on CPU, exact and unpadded.
- `buckets.py`: the size-rounding rules every package pads shapes with (few compiled programs).
"""
