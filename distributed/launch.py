"""`python -m distributed.launch --nproc 2 [--timeout 600] -m MODULE [ARGS ...]`: run MODULE in N
processes on 127.0.0.1 that join one `jax.distributed` program (`distributed/multihost.py`).

Like `torchrun` for one host: a free port for process 0's coordination service, then N children,
each told the address, the number of processes and its rank through the environment
(`multihost.initialize_from_env` reads them). The launcher then watches them:

- all exit 0: it exits 0;
- one exits non-zero (or is killed): it names that rank and its exit status (a rank killed by a
  signal before one that exited with an error: the others fail because their peer is gone), stops
  the others and exits 1 (they would otherwise wait in a collective for a peer that is gone);
- `--timeout` seconds pass: it names the ranks still running, stops them and exits 124.

Each child runs in a process group of its own, and stopping it means SIGTERM to that group, then
SIGKILL after a grace period: when the launcher returns, no child (nor anything a child started) is
left. `--cpu-devices N` gives each child N fake CPU devices (XLA_FLAGS), for meshes larger than the
number of processes on a machine without accelerators.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from distributed.mesh import with_cpu_devices
from distributed.multihost import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

GRACE_S = 5.0  # after SIGTERM, how long a child may take to exit before SIGKILL
POLL_S = 0.05


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(rank: int, nproc: int, port: int, cpu_devices: int | None) -> dict[str, str]:
    env = dict(os.environ, **{COORDINATOR_ENV: f"127.0.0.1:{port}", NUM_PROCESSES_ENV: str(nproc),
                              PROCESS_ID_ENV: str(rank)})
    if cpu_devices is not None:
        env["XLA_FLAGS"] = with_cpu_devices(env.get("XLA_FLAGS", ""), cpu_devices)
    return env


def describe_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every child's process group still running, then SIGKILL what is left after GRACE_S."""
    for sig, wait_s in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, GRACE_S)):
        running = [p for p in procs if p.poll() is None]
        for p in running:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            time.sleep(POLL_S)
    for p in procs:  # reap (a group's other members die with the SIGKILL above)
        p.wait()


def launch(command: list[str], nproc: int, timeout_s: float, cpu_devices: int | None = None) -> int:
    """Run `python COMMAND` in `nproc` ranks (module docstring); returns the launcher's exit code."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen([sys.executable, *command], start_new_session=True,
                                          env=child_env(rank, nproc, port, cpu_devices)))
            print(f"launch: rank {rank} pid {procs[-1].pid}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + timeout_s
        while True:
            codes = [p.poll() for p in procs]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                # a rank killed by a signal is the cause; its peers exit after it, failing their collectives
                rank, code = min(failed, key=lambda failure: failure[1] >= 0)
                others = [r for r, c in enumerate(codes) if c is None]
                also = [f"rank {r} ({describe_exit(c)})" for r, c in failed if r != rank]
                print(f"launch: rank {rank} failed ({describe_exit(code)}); "
                      + (f"also failed: {', '.join(also)}; " if also else "") + f"stopping ranks {others}",
                      file=sys.stderr, flush=True)
                return 1
            if all(code == 0 for code in codes):
                return 0
            if time.monotonic() > deadline:
                running = [r for r, c in enumerate(codes) if c is None]
                print(f"launch: timed out after {timeout_s:g}s; stopping ranks still running: {running}",
                      file=sys.stderr, flush=True)
                return 124
            time.sleep(POLL_S)
    finally:
        stop(procs)


def _raise_on_signal(signum, frame):
    raise SystemExit(128 + signum)  # so that `launch`'s finally stops the children


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distributed.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, required=True, help="number of processes (ranks)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before every rank is stopped")
    parser.add_argument("--cpu-devices", type=int, default=None, help="fake CPU devices per process")
    parser.add_argument("-m", dest="module", required=True, metavar="MODULE ...",
                        help="the module each rank runs, then its arguments (everything after it)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("-m") + 2 if "-m" in argv else len(argv)  # what follows `-m MODULE` is the module's
    args = parser.parse_args(argv[:split])
    for name in ("nproc", "timeout", "cpu_devices"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a killed launcher or a closed terminal: stop the ranks
        signal.signal(sig, _raise_on_signal)
    return launch(["-m", args.module, *argv[split:]], args.nproc, args.timeout, args.cpu_devices)


if __name__ == "__main__":
    sys.exit(main())
