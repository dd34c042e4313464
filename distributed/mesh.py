"""Device meshes: the one place devices are arranged for data, pipeline and tensor parallelism.

    mesh = make_mesh(tp=4)            # 4 devices on the "tp" axis (Megatron tensor parallelism)
    mesh = make_mesh(tp=2, pp=2)      # 2 pipeline stages of 2 tensor-parallel devices each

The axes are always ("dp", "pp", "tp"), in that order (tensor parallelism innermost, so its
collectives run between neighbouring devices, as Megatron places it within a node); an axis of size
1 is still named, so a PartitionSpec may name "tp" whatever the degrees are. The same call works on
GPUs, TPUs and on fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set
before jax is imported).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("dp", "pp", "tp")


def make_mesh(tp: int = 1, pp: int = 1, dp: int = 1, devices=None) -> Mesh:
    """A `Mesh` of dp x pp x tp devices, the first dp * pp * tp of `devices` (default: all of jax's)."""
    for name, size in (("tp", tp), ("pp", pp), ("dp", dp)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"make_mesh: {name} must be a positive int, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    needed = dp * pp * tp
    if needed > len(devices):
        raise ValueError(f"make_mesh: dp x pp x tp = {dp} x {pp} x {tp} = {needed} devices, but only "
                         f"{len(devices)} are available ({devices[0].platform}); on CPU, set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} before importing jax")
    return Mesh(np.array(devices[:needed]).reshape(dp, pp, tp), AXES)


def axis_size(mesh: Mesh, axis: str) -> int:
    """The mesh's size along `axis` (1 when it has no such axis)."""
    return int(mesh.shape.get(axis, 1)) if mesh is not None else 1


CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def with_cpu_devices(xla_flags: str, count: int) -> str:
    """`xla_flags` (an XLA_FLAGS value) asking for `count` fake CPU devices instead of any count it gave."""
    kept = [f for f in xla_flags.split() if not f.startswith(CPU_DEVICES_FLAG)]
    return " ".join(kept + [f"{CPU_DEVICES_FLAG}={count}"])


def request_cpu_devices(count: int) -> None:
    """Ask XLA for `count` fake CPU devices (XLA_FLAGS), for a mesh of `count` devices on a machine
    without accelerators. It takes effect only if jax has not started its CPU backend yet (XLA reads
    the flag then); `make_mesh` names the flag when there are still too few devices. A count the
    flags already give, or more, is left alone."""
    flags = os.environ.get("XLA_FLAGS", "")
    given = [int(f.split("=")[1]) for f in flags.split() if f.startswith(CPU_DEVICES_FLAG + "=")]
    if count > max(given, default=1):
        os.environ["XLA_FLAGS"] = with_cpu_devices(flags, count)
