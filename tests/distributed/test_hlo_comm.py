"""Reading collectives out of HLO text (distributed/hlo_comm.py), asking XLA for fake CPU devices
(distributed/mesh.py), and the engine's `tp` / `pp` settings."""

from __future__ import annotations

import os

import pytest

from continuous_batching.engine_config import EngineConfig, EngineConfigError
from distributed.hlo_comm import collectives, shape_bytes
from distributed.mesh import make_mesh, request_cpu_devices

HLO = """
  %all-reduce.1 = f32[4,576]{1,0} all-reduce(f32[4,576]{1,0} %dot.2), channel_id=1, to_apply=%add
  %ars = (f32[8]{0}, bf16[2,3]{1,0}) all-reduce-start(f32[8]{0} %a, bf16[2,3]{1,0} %b), channel_id=2
  %ard = (f32[8]{0}, bf16[2,3]{1,0}) all-reduce-done((f32[8]{0}, bf16[2,3]{1,0}) %ars)
  %all-gather.7 = s8[2,1536]{1,0} all-gather(s8[1,1536]{1,0} %p), dimensions={0}
  %ags = (s8[1,64]{1,0}, s8[2,64]{1,0}) all-gather-start(s8[1,64]{1,0} %q), dimensions={0}
  %agd = s8[2,64]{1,0} all-gather-done((s8[1,64]{1,0}, s8[2,64]{1,0}) %ags)
  %not-a-collective = f32[4]{0} add(f32[4]{0} %x, f32[4]{0} %y)
"""


def test_collectives_count_each_instruction_once_with_its_result_bytes():
    found = collectives(HLO)
    assert found["all-reduce"] == {"count": 2, "bytes": 4 * 576 * 4 + 8 * 4 + 6 * 2}  # an async pair once
    assert found["all-gather"] == {"count": 2, "bytes": 2 * 1536 + 2 * 64}  # the -done's result, not the -start's tuple
    assert found["reduce-scatter"] == found["collective-permute"] == {"count": 0, "bytes": 0}
    assert shape_bytes("pred[3]") == 3 and shape_bytes("f32[]") == 4


def test_request_cpu_devices_sets_the_flag_once(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2")
    request_cpu_devices(8)
    assert os.environ["XLA_FLAGS"].split() == ["--xla_cpu_enable_fast_math=false",
                                               "--xla_force_host_platform_device_count=8"]
    request_cpu_devices(4)  # already enough
    assert os.environ["XLA_FLAGS"].endswith("=8")


def test_engine_tp_setting_is_checked():
    with pytest.raises(EngineConfigError, match="EngineConfig.tp must be an int >= 1"):
        EngineConfig(tp=0)
    with pytest.raises(EngineConfigError, match="EngineConfig.tp must be 1 when a mesh is given"):
        EngineConfig(tp=2, mesh=make_mesh())


def test_pipeline_stages_refuse_swapping():
    with pytest.raises(EngineConfigError, match="num_cpu_blocks must be 0 with pp > 1"):
        EngineConfig(pp=2, num_cpu_blocks=4, preemption="swap")
