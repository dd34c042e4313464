"""llama.cpp's own quantizer, called through ctypes: the oracle our block formats are held to.

`llama-cpp-python` (the `llama-cpp` extra) ships `libggml-base`, whose
`ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)` writes every block format,
K-quants included, with the same reference code `llama-quantize` uses (no importance matrix).

    lib = load_libggml()            # None when llama-cpp-python is not installed
    rows = ggml_quantize(lib, x, FORMATS["Q4_K"])   # f32[nrows, n_per_row] -> u8[nrows, row_bytes]
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np

from quantization.ggml_formats import BlockFormat


def libggml_path() -> Path | None:
    """libggml-base's path inside the installed llama_cpp package, or None."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*"))
    return candidates[0] if candidates else None


def load_libggml() -> ctypes.CDLL | None:
    path = libggml_path()
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_quantize(lib: ctypes.CDLL, x: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """x f32[nrows, n_per_row] (n_per_row a multiple of the block) -> u8[nrows, row bytes], as llama.cpp writes it."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    nrows, n_per_row = x.shape
    if n_per_row % fmt.block_weights:
        raise ValueError(f"{fmt.name} rows need a multiple of {fmt.block_weights} weights, got {n_per_row}")
    out = np.zeros((nrows, n_per_row // fmt.block_weights * fmt.type_size), np.uint8)
    written = lib.ggml_quantize_chunk(fmt.ggml_type, x.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out
