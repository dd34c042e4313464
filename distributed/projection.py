"""Paper-scale memory and communication model for tensor / pipeline parallel inference (no JAX).

Counts what each device holds and sends when a Llama-architecture model is split the Megatron way
(`tensor_parallel.py`) over `tp` devices and into `pp` pipeline stages (`pipeline.py`): weight bytes,
KV-cache bytes per token, all-reduce bytes per token, and the bandwidth-only times those imply on
A100 / H100 nodes. Pure arithmetic on published shapes and datasheet numbers; nothing is measured.
`projection_row` is what the harness's projection runs report (experiments/parallel_projection.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def num_params(self) -> int:
        """Llama parameter count: embedding and untied LM head, per-layer attention, SwiGLU MLP
        and two RMSNorms, and the final norm."""
        return 2 * self.vocab_size * self.hidden_size + self.num_layers * _layer_params(self, 1) + self.hidden_size


# config.json of meta-llama/Llama-2-{7b,13b,70b}-hf
LLAMA2 = {
    "llama-2-7b": ModelShape("llama-2-7b", 32, 4096, 11008, 32, 32, 128, 32000),
    "llama-2-13b": ModelShape("llama-2-13b", 40, 5120, 13824, 40, 40, 128, 32000),
    "llama-2-70b": ModelShape("llama-2-70b", 80, 8192, 28672, 64, 8, 128, 32000),
}


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int  # HBM capacity
    hbm_bytes_per_s: float  # peak HBM bandwidth
    link_bytes_per_s: float  # NVLink bandwidth per GPU, one direction


# SXM boards, NVIDIA datasheets. Memory: 80 GiB (80 * 2**30 bytes; nvidia-smi shows 81920 MiB on an
# A100-80GB), a slight overestimate of what an H100 leaves usable. NVLink: the datasheets quote the
# bidirectional total (A100 NVLink3 600 GB/s, H100 NVLink4 900 GB/s); a ring all-reduce sends in one
# direction per link, so half of it counts.
GPUS = {
    "A100-80GB": Accelerator("A100-80GB", 80 * 2**30, 2.039e12, 300e9),  # HBM2e 2,039 GB/s
    "H100-80GB": Accelerator("H100-80GB", 80 * 2**30, 3.35e12, 450e9),  # HBM3 3.35 TB/s
}

# What published deployment advice says, per model: (text, source). More sources, not in the table:
# TensorRT-LLM's LLaMA example: Llama-2-70B's 8 KV heads must divide the GPU count (2, 4 or 8; 1 in
# FP8), built FP16 at TP 8 and TP 4 x PP 2 (https://github.com/NVIDIA/TensorRT-LLM/blob/
# 027cd518e3b63809a5c5799187991e7f1164fb12/examples/llama/README.md). Its v0.6.1 performance table:
# LLaMA 70B FP16 on A100 at TP 4, FP8 on H100 at TP 2 or 4; LLaMA 7B mostly at TP 1
# (https://github.com/NVIDIA/TensorRT-LLM/blob/138f96d45f90b9667426f7c47297d8c06bafac73/docs/source/
# performance.md). A TGI maintainer: Llama-2-70B fp16 on 2 x A100-80GB leaves "very small leftovers"
# for the cache, 4 x A100 "should work" (https://github.com/huggingface/text-generation-inference/
# issues/734). No vLLM document naming a tensor_parallel_size for a Llama 2 model was found.
_HF_LLAMA2_BLOG = "https://huggingface.co/blog/llama2#using-text-generation-inference-and-inference-endpoints"
RECOMMENDATIONS = {
    "llama-2-7b": ("Hugging Face (TGI on Inference Endpoints): 1x Nvidia A10G for 7B models", _HF_LLAMA2_BLOG),
    "llama-2-13b": ("Hugging Face (TGI on Inference Endpoints): 1x Nvidia A100 for 13B models", _HF_LLAMA2_BLOG),
    "llama-2-70b": ("Hugging Face (TGI on Inference Endpoints): 4x Nvidia A100, or 2x A100 with "
                    "bitsandbytes quantization, for 70B models", _HF_LLAMA2_BLOG),
}
NO_RECOMMENDATION = ("no recommendation found", "")

# Default KV budget: 64 sequences, each at Llama 2's full 4096-token context, all resident at once:
# the cache a dense (non-paged) allocator reserves for a 64-sequence batch.
DEFAULT_BATCH_SEQUENCES = 64
LLAMA2_CONTEXT_TOKENS = 4096
DEFAULT_KV_TOKENS = DEFAULT_BATCH_SEQUENCES * LLAMA2_CONTEXT_TOKENS
ACTIVATION_BYTES = 2  # fp16 / bf16 KV cache and all-reduced activations
TP_DEGREES = (1, 2, 4, 8)  # within one 8-GPU node
PP_DEGREES = (1, 2, 4, 8)


def kv_heads_per_device(model: ModelShape, tp: int) -> int:
    """KV heads each tp device holds: num_kv_heads / tp, and at least one. Past tp = num_kv_heads
    every head is replicated tp / num_kv_heads times (vLLM's layout). This repo's
    tensor_parallel.py replicates all KV heads when num_kv_heads % tp != 0, which costs more."""
    return math.ceil(model.num_kv_heads / tp)


def _layer_params(model: ModelShape, tp: int) -> int:
    """Parameters of one decoder layer on one tp device (tp 1: the whole layer)."""
    h, hd = model.hidden_size, model.head_dim
    q_and_o = 2 * h * math.ceil(model.num_heads / tp) * hd  # column- / row-parallel by head
    k_and_v = 2 * h * kv_heads_per_device(model, tp) * hd
    mlp = 3 * h * math.ceil(model.intermediate_size / tp)  # gate, up column-; down row-parallel
    return q_and_o + k_and_v + mlp + 2 * h  # the two norms are replicated


def layers_per_stage(model: ModelShape, pp: int) -> list[int]:
    """Decoder layers on each of `pp` stages, as even as possible, earlier stages taking the extra."""
    base, extra = divmod(model.num_layers, pp)
    return [base + (stage < extra) for stage in range(pp)]


def _stage_param_counts(model: ModelShape, tp: int, pp: int) -> list[int]:
    """Parameters one tp device of each stage holds: its layers, plus the vocab-split embedding on
    the first stage and the vocab-split LM head and (replicated) final norm on the last."""
    vocab_slice = math.ceil(model.vocab_size / tp) * model.hidden_size
    counts = [n * _layer_params(model, tp) for n in layers_per_stage(model, pp)]
    counts[0] += vocab_slice
    counts[-1] += vocab_slice + model.hidden_size
    return counts


def weight_bytes_per_device(model: ModelShape, tp: int, pp: int, bytes_per_param: float = 2) -> float:
    """Weight bytes on the fullest device: every layer matrix split over tp (Megatron), KV
    projections at `kv_heads_per_device`, embedding and LM head split by vocabulary, norms
    replicated; layers split over pp stages and the largest stage counted."""
    return max(_stage_param_counts(model, tp, pp)) * bytes_per_param


def kv_bytes_per_token_per_device(model: ModelShape, tp: int, pp: int, bytes_per_elem: float = 2) -> float:
    """KV-cache bytes one cached token costs the fullest device: K and V for each layer of the
    largest stage, over that device's KV heads."""
    layers = max(layers_per_stage(model, pp))
    return 2 * layers * kv_heads_per_device(model, tp) * model.head_dim * bytes_per_elem


def num_allreduces_per_token(model: ModelShape, tp: int) -> int:
    """Megatron's two all-reduces per decoder layer (after attention's output projection and after
    the MLP's down projection), none at tp 1."""
    return 2 * model.num_layers if tp > 1 else 0


def allreduce_bytes_per_token(model: ModelShape, tp: int, bytes_per_elem: float = 2) -> float:
    """All-reduce payload for one token through the whole model: a [hidden_size] vector per
    all-reduce, two per layer; zero at tp 1. Each pipeline stage's tp group carries its layers' share."""
    return num_allreduces_per_token(model, tp) * model.hidden_size * bytes_per_elem


def ring_allreduce_traffic(payload_bytes: float, tp: int) -> float:
    """Bytes each device sends in a ring all-reduce of `payload_bytes` over tp devices:
    reduce-scatter then all-gather, each moving (tp - 1) / tp of the payload."""
    return 2 * (tp - 1) / tp * payload_bytes


def allreduce_seconds_per_token(model: ModelShape, tp: int, gpu: Accelerator, bytes_per_elem: float = 2) -> float:
    """Bandwidth term of one token's all-reduces: ring traffic / NVLink bandwidth per direction.
    Per-message latency is ignored, yet it is paid `num_allreduces_per_token` times per decode
    step, and at small batch, where each message is a [batch, hidden_size] activation of a few
    tens of KiB, it dominates this term."""
    # Size of that latency: NVIDIA/nccl#1259 reports ~6 us for a small all-reduce on 2 H100s
    # (NVLS tree, CUDA graphs).
    payload = allreduce_bytes_per_token(model, tp, bytes_per_elem)
    return ring_allreduce_traffic(payload, tp) / gpu.link_bytes_per_s


def smallest_fit(model: ModelShape, gpu: Accelerator, kv_tokens: int, bytes_per_param: float = 2,
                 memory_fraction: float = 0.9, kv_bytes_per_elem: float = ACTIVATION_BYTES) -> tuple[int, int]:
    """(tp, pp) of the smallest layout whose fullest device holds its weights plus `kv_tokens`
    cached tokens within `memory_fraction` of the GPU's memory. tp grows first over TP_DEGREES
    that divide num_heads (one node); only when the largest of those does not fit do pipeline
    stages (one node each) grow over PP_DEGREES. Raises ValueError when even 8 stages do not fit."""
    budget = memory_fraction * gpu.memory_bytes

    def need(tp: int, pp: int) -> float:
        return (weight_bytes_per_device(model, tp, pp, bytes_per_param)
                + kv_tokens * kv_bytes_per_token_per_device(model, tp, pp, kv_bytes_per_elem))

    tps = [tp for tp in TP_DEGREES if model.num_heads % tp == 0]
    layouts = [(tp, 1) for tp in tps] + [(tps[-1], pp) for pp in PP_DEGREES[1:] if pp <= model.num_layers]
    for tp, pp in layouts:
        if need(tp, pp) <= budget:
            return tp, pp
    tp, pp = layouts[-1]
    raise ValueError(f"{model.name} with {kv_tokens} KV tokens needs {need(tp, pp) / 2**30:.1f} GiB per "
                     f"device even at tp {tp} x pp {pp}; {gpu.name} offers {budget / 2**30:.1f} GiB "
                     f"({memory_fraction:.0%} of its memory)")


def projection_row(model: ModelShape, gpu: Accelerator, kv_tokens: int = DEFAULT_KV_TOKENS,
                   bytes_per_param: float = 2) -> dict:
    """The smallest fitting layout of `model` on `gpu` and what it implies: per-device weight and KV
    GiB, all-reduce payload per token (MB, 1e6 bytes) and its ring time at NVLink bandwidth (us),
    and the HBM lower bound on one decode step (ms; one new token per sequence): every stage's
    weights read once, in turn, KV reads and compute ignored. `recommended` is RECOMMENDATIONS'."""
    tp, pp = smallest_fit(model, gpu, kv_tokens, bytes_per_param)
    all_stage_weights = sum(_stage_param_counts(model, tp, pp)) * bytes_per_param
    text, url = RECOMMENDATIONS.get(model.name, NO_RECOMMENDATION)
    return {
        "model": model.name, "gpu": gpu.name, "tp": tp, "pp": pp,
        "weights_gib_per_device": weight_bytes_per_device(model, tp, pp, bytes_per_param) / 2**30,
        "kv_gib_per_device": kv_tokens * kv_bytes_per_token_per_device(model, tp, pp, ACTIVATION_BYTES) / 2**30,
        "allreduces_per_token": num_allreduces_per_token(model, tp),
        "allreduce_mb_per_token": allreduce_bytes_per_token(model, tp) / 1e6,
        "ring_us_per_token": allreduce_seconds_per_token(model, tp, gpu) * 1e6,
        "hbm_decode_step_ms_lower_bound": all_stage_weights / gpu.hbm_bytes_per_s * 1e3,
        "recommended": text, "recommended_url": url,
    }


def projection_rows(kv_tokens: int = DEFAULT_KV_TOKENS, bytes_per_param: float = 2) -> list[dict]:
    """`projection_row` for every (Llama 2 model, GPU) pair."""
    return [projection_row(model, gpu, kv_tokens, bytes_per_param) for model in LLAMA2.values() for gpu in GPUS.values()]
