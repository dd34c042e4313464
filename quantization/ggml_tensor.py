"""llama.cpp blocks as a `QuantizedTensor`: a GGUF weight kept quantized, in the layout the model's
`linear` and the dequant-matmul kernel read.

    weight = tensor_from_blocks(blocks, "Q4_1", in_features)  # u8[out, bytes per row] -> QuantizedTensor [in, out]
    weight = quantize_to_tensor(w, "Q4_0")                    # w [in, out], through our bit-exact blocks

A GGUF row is one output unit's weights over the inputs, cut into blocks of 32; a QuantizedTensor
groups 32 input rows per output column: the same groups, transposed. The three formats whose block
is one scale (and one minimum) over 32 codes map exactly, with the same bytes per weight:

    Q8_0   d * q          int8 codes, f16 scale per group                       8.5 bits/weight
    Q4_0   d * (q - 8)    signed int4 codes q - 8 (the nibble q ^ 8), f16 scale  4.5 bits/weight
    Q4_1   d * q + m      unsigned int4 codes, f16 scale and f16 `mins`          5.0 bits/weight

and dequantize to the same f32 values as llama.cpp (the tests check bit equality with the `gguf`
package). The codes are stored as planes (all codes, then all scales), not interleaved blocks: the
struct-of-arrays layout GPU kernels read coalesced, which GPTQ / AWQ kernels (Marlin, exllama)
also repack their checkpoints into. Q5_0 / Q5_1 (a fifth bit plane) and the K-quants (scales of
scales) have no QuantizedTensor form yet: a model keeps those dequantized.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from quantization.ggml_formats import block_format, quantize_blocks
from quantization.ggml_legacy import BLOCK, unpack_nibbles
from quantization.quantized_tensor import QuantizedTensor, pack_int4

TENSOR_FORMATS = ("Q4_0", "Q4_1", "Q8_0")  # block formats a QuantizedTensor holds exactly


def tensor_from_blocks(blocks: np.ndarray, name: str, in_features: int) -> QuantizedTensor:
    """blocks u8[out, in_features / 32 * type_size] (a GGUF tensor's data: one row per output unit)
    -> the QuantizedTensor [in_features, out] with the same codes, scales and minimums."""
    if name not in TENSOR_FORMATS:
        raise ValueError(f"a QuantizedTensor holds block formats {list(TENSOR_FORMATS)}, got {name!r}")
    fmt = block_format(name)
    if in_features % BLOCK:
        raise ValueError(f"in_features must be a multiple of {BLOCK}, got {in_features}")
    raw = np.ascontiguousarray(blocks, dtype=np.uint8)
    per_row = in_features // BLOCK * fmt.type_size
    if raw.ndim != 2 or raw.shape[1] != per_row:
        raise ValueError(f"{name} blocks for {in_features} inputs must be u8[out, {per_row}], got {raw.shape}")
    out = raw.shape[0]
    structs = raw.reshape(-1).view(fmt.layout).reshape(out, in_features // BLOCK)  # [out, groups]
    scales = jnp.asarray(structs["d"].T)  # f16[groups, out]
    if name == "Q8_0":
        codes = structs["qs"].reshape(out, in_features).T  # i8[in, out]
        return QuantizedTensor(jnp.asarray(np.ascontiguousarray(codes)), scales, group_size=BLOCK, bits=8)
    nibbles = unpack_nibbles(structs["qs"].reshape(-1, BLOCK // 2)).reshape(out, in_features).T  # i32[in, out], 0..15
    if name == "Q4_0":
        return QuantizedTensor(pack_int4(jnp.asarray(nibbles ^ 8)), scales, group_size=BLOCK, bits=4)
    return QuantizedTensor(pack_int4(jnp.asarray(nibbles)), scales, group_size=BLOCK, bits=4,
                           mins=jnp.asarray(structs["m"].T))


def quantize_to_tensor(weight, name: str) -> QuantizedTensor:
    """weight [in, out] -> its llama.cpp blocks (`quantize_blocks`, bit-exact) as a QuantizedTensor."""
    rows = np.asarray(weight, np.float32).T  # [out, in]: GGUF rows
    blocks = quantize_blocks(rows, name).reshape(rows.shape[0], -1)
    return tensor_from_blocks(blocks, name, rows.shape[1])
