"""Tensor and pipeline parallelism (distributed/): the Megatron layout as PartitionSpecs, the stage
split, and on 8 fake CPU devices (a process of its own, tests/distributed/tp_on_fake_devices.py) one
device's logits at tp 2 / 4 / 8, pp 2 / 3 / 4 and tp x pp, Megatron's two all-reduces per layer in
the compiled HLO, and the engine's greedy tokens with params and KV cache split."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from distributed.mesh import make_mesh
from distributed.tensor_parallel import param_specs, runner_placement
from models.config import PRESETS
from models.llama import init_params

ROOT = Path(__file__).resolve().parents[2]


def test_megatron_layout_on_smollm2_shapes():
    config = PRESETS["smollm2-135m"]
    shapes = jax.eval_shape(lambda: init_params(config))  # ShapeDtypeStructs: no weights made
    specs = param_specs(shapes, config, tp=2)
    layer = specs["layers"][0]
    assert layer["wq"] == P(None, "tp") and layer["w_gate"] == P(None, "tp") and layer["w_up"] == P(None, "tp")
    assert layer["wo"] == P("tp") and layer["w_down"] == P("tp")
    assert layer["wk"] == layer["wv"] == P()  # 3 KV heads do not split in 2: replicated
    assert specs["embed"] == P("tp") and layer["attn_norm"] == P()  # vocab-parallel; norms replicated
    assert param_specs(shapes, config, tp=3)["layers"][0]["wk"] == P(None, "tp")  # 1 KV head per device


def test_mesh_errors_name_the_sizes():
    with pytest.raises(ValueError, match=r"dp x pp x tp = 1 x 1 x 64 = 64 devices, but only 1"):
        make_mesh(tp=64, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="tp must be a positive int"):
        make_mesh(tp=0)
    assert make_mesh().axis_names == ("dp", "pp", "tp")
    assert runner_placement(PRESETS["tiny"], None) == {}


def test_eight_fake_cpu_devices_give_one_devices_logits_and_tokens():
    """Tensor parallel (both forms), pipeline parallel and tp x pp on 8 fake devices: one device's numbers."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "tests.distributed.tp_on_fake_devices"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensor parallel ok" in done.stdout, done.stdout


def test_shard_map_form_names_the_tp_degrees_that_split_along_heads():
    from distributed.tp_layer import local_config, tensor_parallel_sizes

    assert tensor_parallel_sizes(PRESETS["smollm2-135m"], 16) == [1, 3]  # 9 heads, 3 KV heads, 1536 units
    with pytest.raises(ValueError, match=r"tp 2 does not split smollm2-135m .* tp that work: \[1, 3\]"):
        local_config(PRESETS["smollm2-135m"], 2)
    local = local_config(PRESETS["smollm2-135m"], 3)
    assert (local.num_heads, local.num_kv_heads) == (3, 1)


def test_pipeline_stages_split_layers_contiguously():
    from distributed.pipeline import stage_layers

    assert stage_layers(30, 4) == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    with pytest.raises(ValueError, match="pp must be between 1 and the model's 3 layers, got 4"):
        stage_layers(3, 4)
