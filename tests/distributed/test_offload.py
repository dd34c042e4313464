"""Host offload of weights (distributed/offload.py, models/host_offload.py): the last layers stay in
host memory between steps, the model brings them in as it runs, and the engine's tokens, logits and
compiled programs are those of a model wholly in device memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import models
from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig, EngineConfigError
from continuous_batching.model_runner import num_compilations
from continuous_batching.sampling_params import SamplingParams
from distributed.offload import HOST, bytes_by_memory, offload_shardings
from models.host_offload import in_host_memory
from models.llama import forward


@pytest.fixture(scope="module")
def tiny():
    return models.load("tiny", tokenizer=False)


def test_last_layers_stay_in_host_memory_and_logits_do_not_change(tiny):
    placed = jax.device_put(tiny.params, offload_shardings(tiny.params, 2))
    layers = placed["layers"]
    assert not in_host_memory(layers[0]["wq"]) and in_host_memory(layers[1]["wq"]) and in_host_memory(layers[2]["w_down"])
    held = bytes_by_memory(placed)
    layer_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(tiny.params["layers"][2]))
    assert held[HOST] == 2 * layer_bytes and held["device"] + held[HOST] == sum(
        x.nbytes for x in jax.tree_util.tree_leaves(tiny.params))
    tokens = jnp.arange(3, 19)[None]
    positions = jnp.arange(16)[None]
    run = jax.jit(lambda params: forward(params, tokens, positions, config=tiny.config)[0])
    assert jnp.array_equal(run(placed), run(tiny.params))


def test_engine_with_offloaded_layers_gives_the_same_tokens_and_programs(tiny):
    prompts = [[5, 6, 7, 8, 9], list(range(20, 47)), [100, 3]]
    sampling = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    settings = dict(num_blocks=32, block_size=8, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)

    def run(**extra):
        before = num_compilations()
        engine = Engine(tiny, EngineConfig(**settings, **extra))
        tokens = [o.outputs[0].token_ids for o in engine.generate(prompts, sampling, progress=False)]
        return tokens, engine, num_compilations() - before

    plain, _, plain_programs = run()
    offloaded, engine, programs = run(offload_layers=3)
    assert offloaded == plain and programs == plain_programs
    assert bytes_by_memory(engine.runner.params)[HOST] == sum(
        x.nbytes for x in jax.tree_util.tree_leaves(tiny.params["layers"]))


def test_offload_settings_are_checked(tiny):
    with pytest.raises(EngineConfigError, match="offload_layers must be 0 on a mesh"):
        EngineConfig(offload_layers=2, tp=2)
    with pytest.raises(ValueError, match=r"offload_layers \(4\) must be <= the model's 3 layers"):
        Engine(tiny, EngineConfig(num_blocks=8, max_model_len=64, offload_layers=4))
