"""Several processes on 127.0.0.1 (distributed/launch.py, distributed/multihost.py,
continuous_batching/multihost.py): two ranks serve requests through one tensor-parallel engine and
give one device's tokens; a rank that crashes, or ranks that outlive the timeout, make the launcher
exit non-zero in time, naming the rank, with no process left behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import models
from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.multihost import check_multihost, engine_config
from continuous_batching.sampling_params import SamplingParams
from distributed.launch import launch, main as launch_main

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 180  # the launcher's own bound; the test's is a minute more


def run_launcher(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device per process: the mesh spans the processes
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "distributed.launch", "--nproc", "2", "--timeout",
                           str(LAUNCH_TIMEOUT_S), "-m", "continuous_batching.multihost", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S + 60)
    return done, time.monotonic() - start


def child_pids(stderr: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"launch: rank \d+ pid (\d+)", stderr)]


def assert_gone(pids: list[int]) -> None:
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_two_processes_serve_one_devices_tokens(tmp_path):
    done, _ = run_launcher("--model", "tiny", "--tp", "2", "--out", str(tmp_path / "out.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["processes"] == 2 and result["tp"] == 2 and len(result["devices"]) == 2
    model = models.load("tiny", tokenizer=False)
    engine = Engine(model, engine_config(mesh=None))
    sampling = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in engine.generate(result["prompts"], sampling, progress=False)]
    assert result["tokens"] == want
    assert "rank 1: ran" in done.stderr  # the follower ran the leader's steps
    assert_gone(child_pids(done.stderr))


@pytest.mark.parametrize("rank", [0, 1])
def test_a_crashed_rank_stops_the_launch_in_time(rank):
    done, seconds = run_launcher("--model", "tiny", "--fail-rank", str(rank))
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert f"launch: rank {rank} failed (signal SIGKILL)" in done.stderr, done.stderr[-3000:]
    assert seconds < LAUNCH_TIMEOUT_S  # noticed when the rank died, not at the timeout
    assert_gone(child_pids(done.stderr))


def test_ranks_past_the_timeout_are_stopped(capfd):
    start = time.monotonic()
    code = launch(["-c", "import time; time.sleep(120)"], nproc=2, timeout_s=1)
    assert code == 124 and time.monotonic() - start < 30
    stderr = capfd.readouterr().err
    assert "timed out after 1s; stopping ranks still running: [0, 1]" in stderr
    assert_gone(child_pids(stderr))


def test_launcher_and_engine_refuse_bad_settings():
    with pytest.raises(SystemExit):
        launch_main(["--nproc", "0", "-m", "continuous_batching.multihost"])
    with pytest.raises(ValueError, match="num_cpu_blocks must be 0 across processes"):
        check_multihost(EngineConfig(num_cpu_blocks=4))
    with pytest.raises(ValueError, match="pp must be 1 across processes"):
        check_multihost(EngineConfig(pp=2))
