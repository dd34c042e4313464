"""Weights in and out: HF state dicts, HF checkpoint folders (config.json + *.safetensors).

Every loader goes through `params_from_hf_state_dict`, which checks each tensor's presence and shape
and names the tensor when something is wrong. GGUF files are in `models.gguf_loading`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from models.config import DTYPES, ModelConfig
from models.llama import Params

# our layer key -> (HF tensor name suffix, whether it is a [out, in] matmul weight to transpose)
_LAYER_TENSORS = {
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
    "attn_norm": ("input_layernorm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
}


class CheckpointError(ValueError):
    """A checkpoint does not match the model config (missing tensor, wrong shape, ...)."""


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF Llama checkpoint of this config holds, with its HF-layout shape."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    layer_shapes = {"wq": (config.num_heads * hd, d), "wk": (config.num_kv_heads * hd, d),
                    "wv": (config.num_kv_heads * hd, d), "wo": (d, config.num_heads * hd),
                    "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f), "attn_norm": (d,), "mlp_norm": (d,)}
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(config.num_layers):
        for key, (suffix, _) in _LAYER_TENSORS.items():
            shapes[f"model.layers.{i}.{suffix}"] = layer_shapes[key]
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config: ModelConfig,
                              dtype: str = "float32") -> Params:
    """Convert a HF Llama state dict (name -> array-like in HF `[out, in]` layout) to our params.

    Raises CheckpointError naming the first missing or mis-shaped tensor.
    """
    _check_dtype(dtype)
    expected = hf_tensor_shapes(config)
    for name, shape in expected.items():
        if name not in state_dict:
            raise CheckpointError(f"checkpoint is missing tensor {name!r} (expected shape {shape})")
        actual = tuple(state_dict[name].shape)
        if actual != shape:
            raise CheckpointError(f"tensor {name!r} has shape {actual}, expected {shape}")

    def get(name: str, transpose: bool) -> jnp.ndarray:
        array = np.asarray(state_dict[name], dtype=np.float32)
        return jnp.asarray(array.T if transpose else array, dtype=dtype)

    params: Params = {"embed": get("model.embed_tokens.weight", False),
                      "final_norm": get("model.norm.weight", False), "layers": []}
    for i in range(config.num_layers):
        params["layers"].append({key: get(f"model.layers.{i}.{suffix}", transpose)
                                 for key, (suffix, transpose) in _LAYER_TENSORS.items()})
    if not config.tie_word_embeddings:
        params["lm_head"] = get("lm_head.weight", True)
    return params


def params_to_hf_state_dict(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our params as a HF Llama state dict of f32 numpy arrays (inverse of the above)."""
    def host(x, transpose: bool) -> np.ndarray:
        array = np.asarray(jnp.asarray(x, jnp.float32))
        return np.ascontiguousarray(array.T if transpose else array)

    state = {"model.embed_tokens.weight": host(params["embed"], False),
             "model.norm.weight": host(params["final_norm"], False)}
    for i, layer in enumerate(params["layers"]):
        for key, (suffix, transpose) in _LAYER_TENSORS.items():
            state[f"model.layers.{i}.{suffix}"] = host(layer[key], transpose)
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = host(params["lm_head"], True)
    return state


def load_hf_checkpoint(path: str | Path, dtype: str = "float32") -> tuple[ModelConfig, Params]:
    """Load a local HF checkpoint folder: `config.json` plus one or more `*.safetensors` files."""
    from safetensors.flax import load_file  # the flax backend reads bf16 checkpoints too

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; a HF checkpoint folder needs one")
    config = ModelConfig.from_hf(json.loads(config_file.read_text()), name=path.name)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weight files")
    state: dict[str, Any] = {}
    for file in files:
        state.update(load_file(str(file)))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints still store the duplicate
    return config, params_from_hf_state_dict(state, config, dtype)


def save_hf_checkpoint(params: Params, config: ModelConfig, path: str | Path) -> Path:
    """Write params as a HF checkpoint folder that both `load_hf_checkpoint` and transformers read."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config = config.to_hf()
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.save_pretrained(path)
    save_file(params_to_hf_state_dict(params, config), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


def params_from_transformers(hf_model: Any, dtype: str = "float32") -> tuple[ModelConfig, Params]:
    """Convert an in-memory transformers `LlamaForCausalLM` (torch) to (config, params)."""
    config = ModelConfig.from_hf(hf_model.config, name=getattr(hf_model.config, "_name_or_path", None))
    state = {name: tensor.detach().float().cpu().numpy() for name, tensor in hf_model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return config, params_from_hf_state_dict(state, config, dtype)


def to_transformers(params: Params, config: ModelConfig, attn_implementation: str | None = None):
    """A transformers `LlamaForCausalLM` (torch, f32) holding exactly these weights; attention is
    transformers' default (SDPA) unless `attn_implementation` names another ("eager", ...)."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is loaded below: skip the random init (~2 s for 135M)
        hf_model = LlamaForCausalLM(config.to_hf(attn_implementation)).eval()
    # the transposed matrices are fresh host copies: torch takes them without copying again
    state = {k: torch.from_numpy(v) if v.flags.writeable else torch.tensor(v)
             for k, v in params_to_hf_state_dict(params, config).items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        hf_model.tie_weights()
    return hf_model
