"""jax's persistent compilation cache for harness runs, so a second run of a config starts fast.

Compiled XLA programs are stored on disk, keyed by the program and the jax/XLA version and flags; a
later process that meets the same program loads it instead of compiling it again. The folder is
`$INFER_LAB_COMPILATION_CACHE` when set (`off` turns the cache off), else `infer-lab/jax` under the
user's cache home (`$XDG_CACHE_HOME`, default `~/.cache`). `python -m experiments.run` takes
`--compilation-cache DIR|off` over both.
"""

from __future__ import annotations

from pathlib import Path

import jax

from models.load_cache import cache_dir_from_env

ENV_VAR = "INFER_LAB_COMPILATION_CACHE"


def default_cache_dir() -> Path | None:
    """The cache folder from the environment; None when `$INFER_LAB_COMPILATION_CACHE` is `off`."""
    return cache_dir_from_env(ENV_VAR, "jax")


def enable_compilation_cache(cache_dir: Path | None) -> Path | None:
    """Store and reuse every compiled program under `cache_dir` (None: leave the cache off).
    Small and quick programs are cached too: a model step's many small host-side programs add up."""
    if cache_dir is None:
        return None
    cache_dir.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir
