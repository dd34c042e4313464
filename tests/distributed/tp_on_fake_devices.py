"""Run by tests/distributed/test_tensor_parallel.py in a process of its own with 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8` must be set before jax is imported): tensor
parallelism at tp 2 / 4 / 8 gives one device's logits and greedy tokens. Prints one line per check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import models
from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.model_runner import num_compilations
from continuous_batching.sampling_params import SamplingParams
from distributed.mesh import make_mesh
from distributed.tensor_parallel import shard_params
from models.config import ModelConfig
from models.llama import forward, init_params
from quantization.schemes import quantize_params

# divisible sizes (8 heads, 2 KV heads: split at tp 2, replicated at tp 4 and 8) and the odd tiny preset
EVEN = ModelConfig(name="tp-even", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=8, num_kv_heads=2, head_dim=8, max_position_embeddings=128)
F32_TOLERANCE = 2e-5  # max |logit difference| vs one device: summation order changes across the all-reduce


def logits_gap(config: ModelConfig, params, tp: int) -> tuple[float, str]:
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (2, 12)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    run = jax.jit(lambda p: forward(p, tokens, positions, config=config)[0])
    sharded = shard_params(params, config, make_mesh(tp=tp))
    hlo = run.lower(sharded).compile().as_text()
    return float(jnp.abs(run(sharded) - run(params)).max()), hlo


def check_logits() -> None:
    assert len(jax.devices()) == 8, jax.devices()
    for config in (EVEN, models.PRESETS["tiny"]):
        params = init_params(config, seed=3)
        for tp in (2, 4, 8):
            gap, hlo = logits_gap(config, params, tp)
            assert gap < F32_TOLERANCE, (config.name, tp, gap)
            if config is EVEN:  # Megatron's two per layer (attention out, MLP down), one for the vocab-split embedding
                assert hlo.count(" all-reduce(") == 2 * config.num_layers + 1, (tp, hlo.count(" all-reduce("))
            print(f"{config.name} tp {tp}: max |logit gap| {gap:.1e}, all-reduces {hlo.count(' all-reduce(')}")
    params = init_params(EVEN, seed=3)
    wq = shard_params(params, EVEN, make_mesh(tp=4))["layers"][0]["wq"]
    assert {s.data.shape for s in wq.addressable_shards} == {(64, 16)}  # a quarter of the 64 columns each
    quantized = quantize_params(params, "int8")
    gap, _ = logits_gap(EVEN, quantized, 4)
    assert gap < F32_TOLERANCE, gap
    print(f"int8 tp 4: max |logit gap| {gap:.1e}")


def check_engine_tokens() -> None:
    model = models.Model(config=EVEN, params=init_params(EVEN, seed=3))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, EVEN.vocab_size, int(n)).tolist() for n in rng.integers(3, 25, 6)]
    sampling = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    settings = dict(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=48, max_model_len=64)

    def run(**extra):
        before = num_compilations()
        engine = Engine(model, EngineConfig(**settings, **extra))
        outputs = [o.outputs[0].token_ids for o in engine.generate(prompts, sampling, progress=False)]
        return outputs, engine, num_compilations() - before

    plain, _, plain_programs = run()
    for tp in (2, 4):
        sharded, engine, programs = run(mesh=make_mesh(tp=tp))
        assert sharded == plain, (tp, sharded, plain)
        assert programs == plain_programs, (tp, programs, plain_programs)  # no step recompiles on a new sharding
        k_cache = engine.runner.kv_cache[0][0]
        print(f"engine tp {tp}: same greedy tokens; KV cache per device {k_cache.addressable_shards[0].data.shape}")


if __name__ == "__main__":
    check_logits()
    check_engine_tokens()
    print("tensor parallel ok")
