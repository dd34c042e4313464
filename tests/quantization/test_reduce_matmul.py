"""The small-batch multiply-reduce matmul: the same numbers as a float64 matmul on the dequantized
weight for every integer layout, a compiled program that never holds the weight in f32 (read from
XLA CPU's optimized HLO), and the layouts it refuses."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quantization.fp8 import quantize_fp8
from quantization.ggml_tensor import quantize_to_tensor
from quantization.reduce_matmul import MAX_TOKENS, reduce_matmul, supported
from quantization.weight_only import quantize_weight

LAYOUTS = {
    "int8": lambda w: quantize_weight(w, 8),
    "int8-asym": lambda w: quantize_weight(w, 8, symmetric=False),
    "int4-g32": lambda w: quantize_weight(w, 4, 32),
    "int4-g128-asym": lambda w: quantize_weight(w, 4, 128, symmetric=False),  # 576 rows: a ragged last group
    "Q4_0": lambda w: quantize_to_tensor(w, "Q4_0"),
    "Q4_1": lambda w: quantize_to_tensor(w, "Q4_1"),  # mins
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("lead", [(1,), (3,)])
def test_matches_the_dequantized_matmul(rng, layout, lead):
    w = jnp.asarray(rng.standard_normal((576, 96)).astype(np.float32) / 10)
    weight = LAYOUTS[layout](w)
    x = jnp.asarray(rng.standard_normal((*lead, 576)).astype(np.float32))
    want = np.asarray(x, np.float64) @ np.asarray(weight.dequantize(jnp.float32), np.float64)
    got = jax.jit(reduce_matmul)(x, weight)
    assert got.shape == (*lead, 96) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max())


def entry_arrays(fn, *args) -> list[tuple[str, int]]:
    """(dtype, elements) of every array the compiled program's entry computation produces."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("ENTRY"):]
    return [(m[1], int(np.prod([int(d) for d in m[2].split(",") if d]))) for m in
            re.finditer(r"= (f32|s8|u8|s32)\[([\d,]*)\]", entry)]


@pytest.mark.parametrize("layout", ["int8", "int4-g128-asym", "Q4_1"])
def test_the_weight_is_never_written_in_f32(layout):
    """The dot over the dequantized weight writes an f32 copy of it (XLA CPU does not fuse the
    convert into the dot); the multiply-reduce reads int8 codes inside one fusion, and int4 codes are
    unpacked to int8 at most."""
    weight = LAYOUTS[layout](jnp.ones((576, 1536)) / 20)
    x = jnp.ones((MAX_TOKENS, 576))
    size = 576 * 1536
    f32_arrays = lambda fn: [n for dtype, n in entry_arrays(fn, x, weight) if dtype == "f32"]  # noqa: E731
    assert max(f32_arrays(lambda x, w: x @ w.dequantize(jnp.float32))) >= size  # the materialized weight
    assert max(f32_arrays(reduce_matmul)) < size // 16  # per-group scales and minimums at most


def test_fp8_codes_are_refused():
    assert not supported(quantize_fp8(jnp.ones((64, 32))))  # XLA CPU does not fuse an FP8 convert
    with pytest.raises(ValueError, match="reduce_matmul takes integer codes"):
        reduce_matmul(jnp.ones((1, 64)), quantize_fp8(jnp.ones((64, 32))))
