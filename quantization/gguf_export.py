"""Write GGUF files llama.cpp runs: a source GGUF's metadata unchanged, its tensors as F32, and
optionally the layers' linear weights in a llama.cpp block format made by our `quantize_blocks`.

    write_gguf(source, dest)                     # every tensor dequantized to F32
    write_gguf(source, dest, block_format="Q4_0")  # attn_q/k/v/output, ffn_gate/up/down as Q4_0 blocks

A GGUF 2-D weight is stored as rows of its input dimension, which is how `quantize_blocks` cuts
them, so the bytes written are exactly the blocks `llama-quantize --pure` would write (tested
bit-exact against libggml); rows a format cannot cut fall back as llama-quantize does
(`format_for_rows`). Norms stay F32 and so does the token embedding, except in the 4-bit formats,
which write it as Q8_0 (`EMBEDDING_Q8_0_SCHEMES`): the same split as `quantization/ggml_params.py`
uses for our own model, so both frameworks compute with the same weights.
"""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import gguf
import numpy as np

from quantization.ggml_formats import format_for_rows, quantize_blocks
from quantization.scheme_names import EMBEDDING_Q8_0_SCHEMES

LINEAR_WEIGHT = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue  # the writer's own header fields, and the file type the caller sets
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)


def _file_type(block_format: str | None) -> int:
    if block_format is None:
        return gguf.LlamaFileType.ALL_F32
    return getattr(gguf.LlamaFileType, f"MOSTLY_{block_format}", gguf.LlamaFileType.GUESSED)


def _tensor_format(name: str, block_format: str | None, row_length: int) -> str:
    """The type one tensor is written in: its block format (or llama-quantize's fallback) for a linear
    weight, Q8_0 for the token embedding of a 4-bit format, F32 otherwise."""
    if block_format is not None and LINEAR_WEIGHT.fullmatch(name):
        return format_for_rows(block_format, row_length)
    if block_format in EMBEDDING_Q8_0_SCHEMES and name == "token_embd.weight":
        return format_for_rows("Q8_0", row_length)
    return "F32"


def write_gguf(source: str | os.PathLike, dest: str | os.PathLike,
               block_format: str | None = None) -> tuple[Path, dict[str, int]]:
    """(dest, how many tensors each tensor type took): `source` rewritten as the module docstring says."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(dest), reader.fields["general.architecture"].contents())
    _copy_metadata(reader, writer)
    writer.add_file_type(_file_type(block_format))
    counts: collections.Counter = collections.Counter()
    for tensor in reader.tensors:
        # gguf shapes list the fastest axis first; numpy wants it last: [rows, row length]
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        array = array.reshape(tuple(reversed([int(n) for n in tensor.shape])))
        used = _tensor_format(tensor.name, block_format, array.shape[-1])
        if used == "F32":
            writer.add_tensor(tensor.name, array)
        elif used == "F16":
            writer.add_tensor(tensor.name, array.astype(np.float16))
        else:
            blocks = quantize_blocks(array, used).reshape(array.shape[0], -1)  # u8[rows, row bytes]
            writer.add_tensor(tensor.name, blocks, raw_dtype=gguf.GGMLQuantizationType[used])
        counts[used] += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dest), dict(counts)
