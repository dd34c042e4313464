"""Attention backends are objects with a device side (the call) and, when paged, a host side (their
metadata builder); a backend never falls back silently to another implementation."""

import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import BACKENDS, PagedBackend, get_backend, paged_backend
from paged_attention.kv_cache import init_paged_kv_cache
from paged_attention.metadata import PagedMetadata


def test_only_the_cpu_backend_builds_index_lists():
    tables, lens = [[3, 1], [2]], [6, 3]
    for name, backend in BACKENDS.items():
        if not isinstance(backend, PagedBackend):
            continue
        metadata = backend.metadata_builder(4, 8, 2).build(tables, lens, [1, 1], num_prefill=0, prefill_tokens=0,
                                                           prefill_seqs=0, decode_seqs=4, max_blocks=4)
        plain = PagedMetadata.build(tables, lens, [1, 1], 4, num_tokens=4, num_seqs=4, max_blocks=4)
        np.testing.assert_array_equal(metadata.slot_mapping, plain.slot_mapping)
        assert metadata.decode_only and (metadata.decode_pairs is not None) == (name == "paged_cpu")


def test_cpu_backend_refuses_metadata_without_its_index_lists():
    k_cache, v_cache = init_paged_kv_cache(1, 8, 4, 2, 8)[0]
    metadata = PagedMetadata.build([[0], [1]], [1, 1], [1, 1], 4)  # no builder: no index lists
    q, k = jnp.zeros((2, 4, 8)), jnp.zeros((2, 2, 8))
    with pytest.raises(ValueError, match="decode_pairs is None"):
        get_backend("paged_cpu")(q, k, k, (k_cache, v_cache), None, metadata)
    out, _ = get_backend("paged_reference")(q, k, k, (k_cache, v_cache), None, metadata)
    assert out.shape == (2, 4, 8)


def test_unknown_or_unpaged_backend_is_a_named_error():
    with pytest.raises(ValueError, match="allowed: .*paged_cpu"):
        get_backend("flash")
    with pytest.raises(ValueError, match="no paged KV cache; allowed: .*paged_reference"):
        paged_backend("contiguous")
