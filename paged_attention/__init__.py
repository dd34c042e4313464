"""KV-cache layouts and attention over them.

Today: the naive contiguous cache (`contiguous.py`), the baseline. The paged cache, block manager
and Pallas paged-attention kernels arrive with the PagedAttention issue.
"""
