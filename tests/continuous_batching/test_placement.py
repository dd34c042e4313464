"""The runner owns the device: the engine runs unchanged on a 1-device mesh and on 2 fake CPU devices
(params, cache and every step's inputs replicated: the hook tensor parallelism will use), and the KV
cache's dtype is a setting of its own, not the params'."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(num_blocks=24, block_size=4, max_num_seqs=4, max_num_batched_tokens=48, max_model_len=64,
             num_cpu_blocks=16, preemption="swap")


def prompts_and_params(seed: int = 1):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 263, int(n)).tolist() for n in rng.integers(3, 25, 6)]
    return prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def tokens(model, **settings) -> tuple[list[list[int]], Engine]:
    prompts, params = prompts_and_params()
    engine = Engine(model, EngineConfig(**SMALL, **settings))
    return [o.outputs[0].token_ids for o in engine.generate(prompts, params, progress=False)], engine


def test_one_device_mesh_gives_the_same_tokens(tiny_model):
    plain, _ = tokens(tiny_model)
    on_mesh, engine = tokens(tiny_model, mesh=Mesh(np.array(jax.devices()[:1]), ("model",)))
    assert on_mesh == plain
    assert engine.scheduler.num_preemptions > 0  # the swaps went through the runner on the mesh too
    assert isinstance(engine.runner.kv_cache[0][0].sharding, NamedSharding)


def test_kv_cache_dtype_is_its_own_setting(tiny_model):
    _, engine = tokens(tiny_model, kv_cache_dtype="bfloat16")
    assert engine.runner.kv_cache[0][0].dtype == np.dtype("bfloat16")
    assert tiny_model.params["embed"].dtype == np.float32
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="int3")


TWO_DEVICES = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh
    import models
    from continuous_batching.engine import Engine
    from continuous_batching.engine_config import EngineConfig
    from continuous_batching.sampling_params import SamplingParams
    from tests.continuous_batching.test_placement import SMALL, prompts_and_params

    assert len(jax.devices()) == 2, jax.devices()
    model = models.load("tiny", random_weights=True, seed=3)
    prompts, params = prompts_and_params()
    def run(**settings):
        engine = Engine(model, EngineConfig(**SMALL, **settings))
        return [o.outputs[0].token_ids for o in engine.generate(prompts, params, progress=False)], engine
    plain, _ = run()
    on_mesh, engine = run(mesh=Mesh(np.array(jax.devices()), ("model",)))
    assert on_mesh == plain, (on_mesh, plain)
    assert engine.scheduler.num_preemptions > 0
    for array in (engine.runner.kv_cache[0][0], engine.runner.params["embed"]):
        assert len(array.sharding.device_set) == 2 and array.sharding.is_fully_replicated
    print("two devices ok")
""")


def test_two_fake_cpu_devices_replicating_everything_give_the_same_tokens():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", TWO_DEVICES], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "two devices ok" in done.stdout


def test_prepare_builds_host_arrays_that_move_to_the_device_in_one_transfer(tiny_model):
    """`runner.prepare` reads the sequences once and leaves every input on the host (numpy): `run`
    moves the whole pytree with one `device_put`. Rows: prompts first, decodes after the prefill rows."""
    from continuous_batching.model_runner import PagedModelRunner
    from continuous_batching.request import Sequence

    runner = PagedModelRunner(tiny_model, num_blocks=8, block_size=4, max_num_seqs=4, max_blocks_per_seq=4)
    decode, prompt = Sequence.in_cache([2], 3, [7]), Sequence.in_cache([0, 1], 6, [5, 9, 14, 3, 7, 8])
    prepared = runner.prepare([decode, prompt])
    leaves = jax.tree_util.tree_leaves(prepared.inputs)
    assert leaves and all(isinstance(leaf, (np.ndarray, np.generic)) for leaf in leaves)  # host values only
    assert prepared.rows == [prepared.shape.prefill_seqs, 0]
