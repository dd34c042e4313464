"""Where a results file came from: the `provenance` object `report.write_results` adds to every
results.json (schema in docs/results.md).

    {"git_commit": "0123abc...", "git_commit_short": "0123abc", "git_dirty": false,
     "date_utc": "2025-01-31T12:00:00+00:00", "command": ["python", "-m", "experiments.run", ...],
     "python": "3.11.9", "packages": {"jax": "0.4.35", "jaxlib": "0.4.35", "transformers": ..., "torch": ...},
     "cpu_count": 2, "xla_cpu_count": 2, "cpu_model": "...", "jax_backend": "cpu", "jax_devices": [...],
     "xla_flags": null, "platform": "Linux-...-x86_64-with-glibc2.36"}

Package versions come from the installed distributions' metadata (nothing is imported for them; a
package that is not installed is null). Git fields are null outside a git work tree or without git;
`git_dirty` counts changes to tracked files only (untracked scratch files do not make a run dirty).
`command` is sys.argv, with a module run by `python -m` written back as such.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

PACKAGES = ("jax", "jaxlib", "transformers", "torch")
_REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    """stdout of `git args` run in the repository holding this file, or None when that fails."""
    try:
        done = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _command(argv: list[str]) -> list[str]:
    """sys.argv as typed: `python -m experiments.run ...` arrives as [".../experiments/run.py", ...]."""
    if argv and argv[0].endswith(".py"):
        path = Path(argv[0]).resolve()
        if path.is_relative_to(_REPO):
            module = ".".join(path.relative_to(_REPO).with_suffix("").parts)
            return ["python", "-m", module, *argv[1:]]
    return list(argv)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor() or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _jax_devices() -> tuple[str | None, list[str]]:
    """jax's default backend and its devices, when jax is already imported (a harness run always
    has it; a process that never needed jax is not made to load it)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None, []
    try:
        return jax.default_backend(), [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    except Exception:  # noqa: BLE001 - a broken backend must not lose the results being written
        return None, []


def host_cores() -> int:
    """CPU cores this process may run on: XLA's CPU thread pool uses them all (not the machine's
    count), and so must torch and llama.cpp in the baselines."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def collect_provenance() -> dict:
    """The provenance object for a results file written now, by this process."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    backend, devices = _jax_devices()
    return {
        "git_commit": commit,
        "git_commit_short": commit[:7] if commit else None,
        "git_dirty": None if status is None else bool(status),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": _command(sys.argv),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cpu_count": os.cpu_count(),
        "xla_cpu_count": host_cores(),
        "cpu_model": _cpu_model(),
        "jax_backend": backend,
        "jax_devices": devices,
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "platform": platform.platform(),
    }
