"""Run by tests/distributed/test_tensor_parallel.py in a process of its own with 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8` must be set before jax is imported): tensor
parallelism at tp 2 / 4 / 8 in both forms (GSPMD shardings, and the shard_map layer with explicit
psums), pipeline stages with micro-batches (pp 2 / 3 / 4, and pp x tp), all giving one device's
logits, and the engine's tokens with params and cache split over tp, over pipeline stages, or both.
Prints one line per check."""

from __future__ import annotations

import dataclasses

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
from distributed.pipeline import Pipeline
from distributed.tp_layer import megatron_layer, megatron_layer_params
from models.llama import decoder_layer, forward, init_params
from models.ops import get_ops, rope_cos_sin
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


PROMPTS = [np.random.default_rng(1).integers(3, EVEN.vocab_size, int(n)).tolist()
           for n in np.random.default_rng(2).integers(3, 25, 6)]
SETTINGS = dict(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=48, max_model_len=64)
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def engine_tokens(model: models.Model, sampling: SamplingParams = GREEDY, **extra):
    """(each request's samples' tokens, the engine, step programs compiled) for PROMPTS."""
    before = num_compilations()
    engine = Engine(model, EngineConfig(**SETTINGS, **extra))
    outputs = [[c.token_ids for c in o.outputs] for o in engine.generate(PROMPTS, sampling, progress=False)]
    return outputs, engine, num_compilations() - before


def check_engine_tokens() -> None:
    """Tensor parallel engine: params and cache split (tp 2: attention on each device's own KV
    head), or the cache replicated (tp 4): one device's tokens, no extra step programs."""
    model = models.Model(config=EVEN, params=init_params(EVEN, seed=3))
    plain, _, plain_programs = engine_tokens(model)
    for tp, placement in ((2, {"tp": 2}), (4, {"mesh": make_mesh(tp=4)})):  # the run-config key, or a mesh
        sharded, engine, programs = engine_tokens(model, **placement)
        assert sharded == plain, (tp, sharded, plain)
        assert programs == plain_programs, (tp, programs, plain_programs)  # no step recompiles on a new sharding
        k_cache = engine.runner.kv_cache[0][0]
        print(f"engine tp {tp} ({engine.runner.ops.name}): same greedy tokens; KV cache per device "
              f"{k_cache.addressable_shards[0].data.shape}")


def check_engine_pipeline() -> None:
    """Pipeline stages in the engine (each stage its layers' cache, steps micro-batched): one
    device's greedy tokens, and sampled tokens with prompt blocks shared copy-on-write."""
    deep = dataclasses.replace(EVEN, num_layers=4)
    model = models.Model(config=deep, params=init_params(deep, seed=3))
    plain, _, _ = engine_tokens(model)
    for placement in ({"pp": 2}, {"pp": 4}, {"pp": 2, "tp": 2}, {"pp": 3, "enable_prefix_caching": True}):
        staged, engine, _ = engine_tokens(model, **placement)
        assert staged == plain, (placement, staged, plain)
        devices = [sorted(d.id for d in layer[0].sharding.device_set) for layer in engine.runner.kv_cache]
        print(f"engine {placement}: same greedy tokens; each layer's KV cache on devices {devices}")
    sampled = SamplingParams(max_tokens=6, temperature=0.8, n=3, seed=7)
    one, _, _ = engine_tokens(model, sampled, enable_prefix_caching=True)
    staged, _, _ = engine_tokens(model, sampled, enable_prefix_caching=True, pp=2)
    assert staged == one
    print("engine pp 2: same sampled tokens with n=3 samples sharing their prompt's blocks")


def check_engine_int8() -> None:
    """An int8 weight-only model (codes and scales split with their weights) through the engine at
    tp 2 and pp 2: the greedy tokens of the same int8 model on one device."""
    deep = dataclasses.replace(EVEN, num_layers=4)
    model = models.Model(config=deep, params=quantize_params(init_params(deep, seed=3), "int8"))
    plain, _, _ = engine_tokens(model)
    for placement in ({"tp": 2}, {"pp": 2}):
        split, engine, _ = engine_tokens(model, **placement)
        assert split == plain, (placement, split, plain)
        print(f"engine int8 {placement}: same greedy tokens as int8 on one device")


def check_megatron_layer() -> None:
    """The shard_map layer (two explicit psums) against one device's decoder_layer."""
    layer = init_params(EVEN, seed=3)["layers"][0]
    rng = np.random.default_rng(2)
    hidden, residual = (jnp.asarray(rng.standard_normal((2, 12, EVEN.hidden_size)), jnp.float32) for _ in range(2))
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    cos, sin = rope_cos_sin(positions, EVEN.head_dim, EVEN.rope_theta)
    want = decoder_layer(layer, hidden, residual, cos, sin, None, positions, None, config=EVEN,
                         backend="contiguous", ops=get_ops("xla"))[:2]
    for tp in (2, 4, 8):
        run = jax.jit(megatron_layer(megatron_layer_params(layer, EVEN, tp), EVEN, make_mesh(tp=tp)))
        got = run(hidden, residual, cos, sin, positions)
        gap = max(float(jnp.abs(g - w).max()) for g, w in zip(got, want))
        reduces = run.lower(hidden, residual, cos, sin, positions).compile().as_text().count(" all-reduce(")
        assert gap < F32_TOLERANCE and reduces == 2, (tp, gap, reduces)
        print(f"megatron layer tp {tp}: max |gap| {gap:.1e}, all-reduces {reduces}")


def check_pipeline() -> None:
    """Stages over "pp" (with tp inside them) and micro-batches give one device's logits."""
    for config, meshes in ((dataclasses.replace(EVEN, num_layers=4, tie_word_embeddings=True),
                            ((2, 1, 2), (4, 1, 1), (2, 2, 4))),  # (pp, tp, micro-batches)
                           (models.PRESETS["tiny"], ((2, 1, 2), (3, 2, 1)))):
        params = init_params(config, seed=5)
        tokens = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (4, 10)), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(10), tokens.shape)
        want = forward(params, tokens, positions, config=config)[0]
        for pp, tp, microbatches in meshes:
            pipe = Pipeline(params, config, make_mesh(pp=pp, tp=tp), num_microbatches=microbatches)
            for stage, stage_mesh in zip(pipe.stages, pipe.meshes):  # each stage's weights on its own devices
                assert pipe.stages[0]["layers"][0]["wq"].sharding.device_set.isdisjoint(
                    stage["layers"][0]["wq"].sharding.device_set) or stage is pipe.stages[0]
                assert stage["layers"][0]["wq"].sharding.device_set == set(stage_mesh.devices.flat)
            gap = float(jnp.abs(pipe.forward(tokens, positions) - want).max())
            assert gap < F32_TOLERANCE, (config.name, pp, tp, gap)
            print(f"{config.name} pp {pp} x tp {tp}, {microbatches} micro-batches "
                  f"(layers {[len(r) for r in pipe.ranges]}): max |logit gap| {gap:.1e}")


if __name__ == "__main__":
    check_pipeline()
    check_megatron_layer()
    check_logits()
    check_engine_tokens()
    check_engine_pipeline()
    check_engine_int8()
    print("tensor parallel ok")
