"""llama.cpp block formats as bytes: `quantize_blocks` / `dequantize_blocks`, bit-exact with llama.cpp.

    blocks = quantize_blocks(x, "Q4_K")      # f32[..., k] (k a multiple of 256) -> u8[num_blocks, 144]
    x_hat = dequantize_blocks(blocks, "Q4_K")  # -> f32[num_blocks, 256]

A GGUF tensor's data is exactly these rows back to back (`gguf.GGUFReader` gives them as u8[rows,
bytes per row]; reshape to `(-1, type_size)`), so a file written with our blocks loads in llama.cpp,
and a shipped file's blocks decode here. Formats (`FORMATS`):

    name   weights/block  bytes  bits/weight  weight
    Q4_0   32             18     4.5          d * (q - 8)
    Q4_1   32             20     5.0          d * q + m
    Q5_0   32             22     5.5          d * (q - 16)
    Q5_1   32             24     6.0          d * q + m
    Q8_0   32             34     8.5          d * q
    Q4_K   256            144    4.5          d * sc * q - dmin * m   (8 sub-blocks of 32)
    Q6_K   256            210    6.5625       d * sc * (q - 32)       (16 sub-blocks of 16)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from quantization import ggml_kquants as kq
from quantization import ggml_legacy as legacy


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    name: str
    ggml_type: int  # llama.cpp's `enum ggml_type` value (= gguf.GGMLQuantizationType)
    block_weights: int
    layout: np.dtype  # the C block struct as a packed numpy structured dtype
    quantize: Callable[[np.ndarray], np.ndarray]  # f32[n, block_weights] -> layout[n]
    dequantize: Callable[[np.ndarray], np.ndarray]  # layout[n] -> f32[n, block_weights]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return self.layout.itemsize

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_weights


FORMATS: dict[str, BlockFormat] = {f.name: f for f in (
    BlockFormat("Q4_0", 2, legacy.BLOCK, legacy.Q4_0, legacy.quantize_q4_0, legacy.dequantize_q4_0),
    BlockFormat("Q4_1", 3, legacy.BLOCK, legacy.Q4_1, legacy.quantize_q4_1, legacy.dequantize_q4_1),
    BlockFormat("Q5_0", 6, legacy.BLOCK, legacy.Q5_0, legacy.quantize_q5_0, legacy.dequantize_q5_0),
    BlockFormat("Q5_1", 7, legacy.BLOCK, legacy.Q5_1, legacy.quantize_q5_1, legacy.dequantize_q5_1),
    BlockFormat("Q8_0", 8, legacy.BLOCK, legacy.Q8_0, legacy.quantize_q8_0, legacy.dequantize_q8_0),
    BlockFormat("Q4_K", 12, kq.QK_K, kq.Q4_K, kq.quantize_q4_k, kq.dequantize_q4_k),
    BlockFormat("Q6_K", 14, kq.QK_K, kq.Q6_K, kq.quantize_q6_k, kq.dequantize_q6_k),
)}
# llama-quantize's `tensor_type_fallback`: a 256-weight format for rows it cannot cut (SmolLM2's 576)
FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def format_for_rows(name: str, row_len: int) -> str:
    """The format llama.cpp writes a tensor with rows of `row_len` weights in when asked for `name`:
    `name`, its fallback when the row does not divide into its blocks, or "F16" when neither does."""
    if row_len % block_format(name).block_weights == 0:
        return name
    if name in FALLBACK:
        return format_for_rows(FALLBACK[name], row_len)
    return "F16"


def block_format(name: str) -> BlockFormat:
    if name not in FORMATS:
        raise ValueError(f"block format must be one of {sorted(FORMATS)}, got {name!r}")
    return FORMATS[name]


def quantize_blocks(x, name: str) -> np.ndarray:
    """x f32[..., k] (k a multiple of the format's block) -> u8[num_blocks, type_size]; rows of x
    are cut into blocks in order, so a [rows, k] tensor gives rows * k / block_weights blocks."""
    fmt = block_format(name)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % fmt.block_weights:
        raise ValueError(f"quantize_blocks({name}): the last dimension must be a multiple of "
                         f"{fmt.block_weights}, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"quantize_blocks({name}): x holds NaN or inf")
    blocks = fmt.quantize(x.reshape(-1, fmt.block_weights))
    return blocks.view(np.uint8).reshape(len(blocks), fmt.type_size)


def dequantize_blocks(blocks, name: str) -> np.ndarray:
    """u8[num_blocks, type_size] (or any u8 array of whole blocks) -> f32[num_blocks, block_weights]."""
    fmt = block_format(name)
    raw = np.ascontiguousarray(blocks, dtype=np.uint8)
    if raw.size % fmt.type_size:
        raise ValueError(f"dequantize_blocks({name}): {raw.size} bytes is not a whole number of "
                         f"{fmt.type_size}-byte blocks")
    return fmt.dequantize(raw.reshape(-1).view(fmt.layout))
