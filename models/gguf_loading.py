"""Load llama.cpp GGUF files (e.g. the SmolLM2 Q4_1 file) into our params.

The `gguf` package reads the file and dequantizes each tensor to f32 (`gguf.quants.dequantize`); the
array comes out in HF `[out, in]` order. llama.cpp's converter permuted the q/k projection rows into
its interleaved-RoPE order; we undo that so our rotate-half RoPE applies unchanged. With
`keep_quantized`, projections stored in Q4_0 / Q4_1 / Q8_0 stay quantized instead: their blocks
become `QuantizedTensor` leaves (`quantization.ggml_tensor`) holding the file's codes, scales and
minimums, the same bytes, dequantizing to the same f32 values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from models.config import ModelConfig
from models.llama import Params
from models.load_cache import cached_state, cached_tokenizer, default_model_cache_dir, entry_dir
from models.loading import CheckpointError, params_from_hf_state_dict
from quantization.ggml_tensor import TENSOR_FORMATS, tensor_from_blocks

# GGUF tensor name -> HF tensor name ({i} = layer index)
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
# GGUF projection name -> our params key (models/llama.py)
_GGUF_PROJECTIONS = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
                     "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, name: str) -> ModelConfig:
    """ModelConfig from a GGUF file's `llama.*` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: 'llama'")
    tensor_names = {t.name for t in reader.tensors}
    num_heads = _field(reader, "llama.attention.head_count")
    hidden = _field(reader, "llama.embedding_length")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        name=name,
        vocab_size=_field(reader, "llama.vocab_size", int(embed.shape[1])),
        hidden_size=hidden,
        intermediate_size=_field(reader, "llama.feed_forward_length"),
        num_layers=_field(reader, "llama.block_count"),
        num_heads=num_heads,
        num_kv_heads=_field(reader, "llama.attention.head_count_kv", num_heads),
        head_dim=_field(reader, "llama.rope.dimension_count", hidden // num_heads),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        # GGUF stores f32; its shortest decimal (1e-05, not 9.99999975e-06) is the value that was meant
        rms_norm_eps=float(str(np.float32(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)))),
        tie_word_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=_field(reader, "llama.context_length", 2048),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (eos,),
    )


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half halves).

    weight: [num_heads * head_dim, in]. llama.cpp stores each head's rows as (d/2, 2) pairs; HF
    stores them as (2, d/2) halves.
    """
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def load_gguf(path: str | os.PathLike, dtype: str = "float32", *, cache: bool = True,
              keep_quantized: bool = False) -> tuple[ModelConfig, Params]:
    """Read a GGUF file and dequantize every tensor into our params (f32 or bf16). With `cache`,
    the dequantized tensors come from (or go to) the model cache (`models.load_cache`). With
    `keep_quantized`, the projections in a format a QuantizedTensor holds (`TENSOR_FORMATS`) keep
    the file's blocks (`quantized_projections`); norms and the embedding table are dequantized."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    cache_dir = default_model_cache_dir() if cache else None
    if cache_dir is None:
        config, state = read_gguf_state(path)
    else:
        config, state = cached_state(entry_dir(cache_dir, path), lambda: read_gguf_state(path))
    try:
        params = params_from_hf_state_dict(state, config, dtype)
    except CheckpointError as err:
        raise CheckpointError(f"{path.name}: {err}") from None
    return config, quantized_projections(path, config, params) if keep_quantized else params


def quantized_projections(path: Path, config: ModelConfig, params: Params) -> Params:
    """params with each projection whose GGUF tensor is Q4_0, Q4_1 or Q8_0 replaced by those blocks
    as a QuantizedTensor [in, out] (q/k rows unpermuted like the dequantized weights: whole GGUF
    rows move, blocks intact); projections in other formats keep their dequantized arrays."""
    import gguf

    layers = [dict(layer) for layer in params["layers"]]
    for tensor in gguf.GGUFReader(path).tensors:
        parts = tensor.name.split(".")
        if parts[0] != "blk" or parts[2] not in _GGUF_PROJECTIONS:
            continue
        block_format = gguf.GGMLQuantizationType(tensor.tensor_type).name
        if block_format not in TENSOR_FORMATS:
            continue
        blocks = np.asarray(tensor.data)  # u8[out, bytes per row]
        if parts[2] in ("attn_q", "attn_k"):
            blocks = unpermute_rope_rows(blocks, config.num_heads if parts[2] == "attn_q" else config.num_kv_heads)
        layers[int(parts[1])][_GGUF_PROJECTIONS[parts[2]]] = tensor_from_blocks(blocks, block_format,
                                                                             int(tensor.shape[0]))
    return {**params, "layers": layers}


def read_gguf_state(path: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """The file's config and its tensors dequantized to f32, under HF names in HF `[out, in]` layout."""
    import gguf

    reader = gguf.GGUFReader(path)
    config = config_from_gguf(reader, name=path.stem)
    state: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        hf_name = _hf_name(tensor.name)
        if hf_name is None:
            continue  # e.g. rope_freqs tables that llama.cpp precomputes; not weights we use
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        array = array.reshape(tuple(reversed([int(n) for n in tensor.shape])))  # HF [out, in] order
        if hf_name.endswith("q_proj.weight"):
            array = unpermute_rope_rows(array, config.num_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = unpermute_rope_rows(array, config.num_kv_heads)
        state[hf_name] = array
    return config, state


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2:
        template, index = ".".join(["blk", "{i}", *parts[2:]]), parts[1]
        hf = _GGUF_TO_HF.get(template)
        return None if hf is None else hf.format(i=index)
    return _GGUF_TO_HF.get(gguf_name)


def load_gguf_tokenizer(path: str | os.PathLike, *, cache: bool = True):
    """The tokenizer (and chat template) stored in a GGUF file, via transformers, offline; with
    `cache`, converted once and then read from the model cache (`models.load_cache`).

    Returns None when the file carries no tokenizer (no `tokenizer.ggml.tokens`)."""
    path = Path(path)
    cache_dir = default_model_cache_dir() if cache else None
    if cache_dir is None:
        return convert_gguf_tokenizer(path)
    return cached_tokenizer(entry_dir(cache_dir, path), lambda: convert_gguf_tokenizer(path))


def convert_gguf_tokenizer(path: Path):
    """transformers' conversion of the file's tokenizer into a fast tokenizer (None: it has none)."""
    import gguf
    from transformers import AutoTokenizer

    if "tokenizer.ggml.tokens" not in gguf.GGUFReader(path).fields:
        return None
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
