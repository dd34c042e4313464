"""A model's projections rounded through a llama.cpp block format, for accuracy measurements.

`round_through_blocks(params, "Q4_0")` quantizes every layer's projection weights the way
`llama-quantize --pure` would (blocks along each weight's input dimension, which is a GGUF row; a
format that cannot cut a row falls back as llama.cpp does: Q4_K -> Q5_0, Q6_K -> Q8_0 for 576-wide
rows; rows no format divides stay in F16) and returns them dequantized to f32: the weights llama.cpp computes with, in a params tree
the unchanged model runs: accuracy and size for every format. `blocks_as_tensors` keeps the
formats a QuantizedTensor holds exactly (Q4_0, Q4_1, Q8_0; `ggml_tensor.py`) as blocks instead, so
the model runs on them (same weights, and speed too). Norms stay as they are, and so does the
embedding table except in the 4-bit formats, which keep a tied one as Q8_0 blocks (like
`quantize_params`: `quantization/quantized_embedding.py`).
"""

from __future__ import annotations

import collections

import jax.numpy as jnp
import numpy as np

from quantization.ggml_formats import dequantize_blocks, format_for_rows, quantize_blocks
from quantization.ggml_legacy import BLOCK
from quantization.ggml_tensor import TENSOR_FORMATS, quantize_to_tensor
from quantization.quantized_embedding import quantize_embedding
from quantization.scheme_names import EMBEDDING_Q8_0_SCHEMES
from quantization.schemes import PROJECTIONS


def round_weight(weight, name: str) -> tuple[np.ndarray, str, int]:
    """weight [in, out] -> (the weight rounded through the format, f32[in, out]; the format used; bytes
    its blocks take)."""
    rows = np.asarray(weight, np.float32).T  # GGUF rows: one output unit's weights over the inputs
    used = format_for_rows(name, rows.shape[1])
    if used == "F16":
        return np.ascontiguousarray(rows.astype(np.float16).astype(np.float32).T), used, rows.size * 2
    blocks = quantize_blocks(rows, used)
    rounded = dequantize_blocks(blocks, used).reshape(rows.shape).T
    return np.ascontiguousarray(rounded), used, blocks.nbytes


def round_through_blocks(params: dict, name: str) -> tuple[dict, dict]:
    """(params with every projection rounded through format `name`, a summary: `bytes` and `weights`
    of the projections as blocks, and `formats`, how many tensors each format took)."""
    summary = {"bytes": 0, "weights": 0, "formats": collections.Counter()}
    layers = []
    for layer in params["layers"]:
        layer = dict(layer)
        for key in PROJECTIONS:
            if key in layer:
                rounded, used, nbytes = round_weight(layer[key], name)
                summary["bytes"] += nbytes
                summary["weights"] += rounded.size
                summary["formats"][used] += 1
                layer[key] = jnp.asarray(rounded, layer[key].dtype)
        layers.append(layer)
    return _with_embedding({**params, "layers": layers}, name), summary


def blocks_as_tensors(params: dict, name: str) -> dict | None:
    """params with every projection quantized to format `name` and kept as its blocks (a
    QuantizedTensor with the same bytes); None when `name` has no QuantizedTensor form or a
    projection's input rows do not cut into 32-weight blocks (llama.cpp would fall back to F16)."""
    layers = params["layers"]
    if name not in TENSOR_FORMATS or any(layer[k].shape[0] % BLOCK for layer in layers for k in PROJECTIONS if k in layer):
        return None
    return _with_embedding({**params, "layers": [
        {**layer, **{k: quantize_to_tensor(layer[k], name) for k in PROJECTIONS if k in layer}} for layer in layers]}, name)


def _with_embedding(params: dict, name: str) -> dict:
    """params with a tied embedding table as Q8_0 blocks when format `name` is a 4-bit one."""
    return quantize_embedding(params) if name in EMBEDDING_Q8_0_SCHEMES else params
