"""Several processes, one SPMD program: `jax.distributed` and the one message the leader sends.

JAX runs several processes (one per host, or here several on 127.0.0.1) as one program: after
`jax.distributed.initialize`, `jax.devices()` lists every process's devices, a `Mesh` may span them,
and each process runs the same jitted programs, in the same order, on its own shards (XLA moves the
data between processes: gloo on CPU, NCCL on GPUs). Every process must therefore feed each program
the same inputs. The engine keeps one scheduler, on process 0, and sends the others what it
decided (`broadcast_object`), as vLLM's multi-node executor broadcasts the scheduler's output to its
workers; here the message goes through jax's own collectives, with no RPC layer of our own.

`python -m distributed.launch` starts the processes and sets the variables `initialize_from_env`
reads: the coordinator's address, the number of processes and this process's rank.
"""

from __future__ import annotations

import os
import pickle

import jax
import numpy as np

COORDINATOR_ENV = "INFER_LAB_COORDINATOR"  # host:port of process 0's coordination service
NUM_PROCESSES_ENV = "INFER_LAB_NUM_PROCESSES"
PROCESS_ID_ENV = "INFER_LAB_PROCESS_ID"
MIN_MESSAGE_BYTES = 256  # messages are padded to a power of two: one compiled broadcast per size class


def initialize_from_env(timeout_s: int = 60) -> int:
    """`jax.distributed.initialize` from the launcher's variables; returns this process's rank.
    Waits at most `timeout_s` for every process to join (then jax raises)."""
    missing = [name for name in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV) if name not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: start this program with "
                           f"`python -m distributed.launch --nproc N -m MODULE ...`")
    rank = int(os.environ[PROCESS_ID_ENV])
    jax.distributed.initialize(coordinator_address=os.environ[COORDINATOR_ENV],
                               num_processes=int(os.environ[NUM_PROCESSES_ENV]), process_id=rank,
                               initialization_timeout=timeout_s)
    return rank


def broadcast_object(obj=None):
    """Process 0's `obj` (any picklable value) on every process; the others pass anything (ignored).

    Two collectives (`multihost_utils.broadcast_one_to_all`, a sum in which only process 0
    contributes): the pickled size, then the bytes padded to a power of two (so the broadcast
    programs compile once per size class, not once per message). Single-process: `obj` itself."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return obj
    leader = jax.process_index() == 0
    payload = pickle.dumps(obj) if leader else b""
    size = int(multihost_utils.broadcast_one_to_all(np.array([len(payload)], np.int64))[0])
    padded = max(MIN_MESSAGE_BYTES, 1 << (size - 1).bit_length())
    buffer = np.zeros(padded, np.uint8)  # u8[padded]
    buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return obj if leader else pickle.loads(received[:size].tobytes())
