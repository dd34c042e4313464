"""A cache of converted GGUF files, so the second load of a model takes seconds, not half a minute.

Loading a GGUF file is slow in Python: the `gguf` package parses every metadata field element by
element (SmolLM2's 49k-entry vocabulary and merges), numpy dequantizes each tensor, and transformers
reads the file twice more to convert its tokenizer. The first load stores what came out, the
dequantized f32 tensors in HF layout (`state.safetensors`), the `ModelConfig` read from the file
(`config.json`) and the converted fast tokenizer (`tokenizer/`), in a folder keyed by the file's
path, size and modification time; a later load of the same file reads that folder instead. Each
entry is written to a temporary folder and renamed into place, so a crashed or concurrent writer
never leaves a half-written entry behind.

The cache lives in `$INFER_LAB_MODEL_CACHE` when set (`off` turns it off), else in
`infer-lab/models` under the user's cache home (`$XDG_CACHE_HOME`, default `~/.cache`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from models.config import ModelConfig

ENV_VAR = "INFER_LAB_MODEL_CACHE"
FORMAT_VERSION = 1  # bump when what an entry holds, or how a GGUF file is converted, changes


def cache_home() -> Path:
    """The user's cache home: `$XDG_CACHE_HOME`, else `~/.cache`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def cache_dir_from_env(env_var: str, name: str) -> Path | None:
    """`$env_var` when set (`off`: None, no cache), else `infer-lab/<name>` under the cache home."""
    value = os.environ.get(env_var)
    if value is not None:
        return None if value.strip().lower() == "off" else Path(value).expanduser()
    return cache_home() / "infer-lab" / name


def default_model_cache_dir() -> Path | None:
    """The model cache folder from the environment; None when `$INFER_LAB_MODEL_CACHE` is `off`."""
    return cache_dir_from_env(ENV_VAR, "models")


def file_key(path: Path, version: int) -> str:
    """A short hash naming one version of a file: a new path, size or modification time (or a new
    `version` of what is derived from it) is a new key."""
    stat = path.stat()
    key = f"{version}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def entry_dir(cache_dir: Path, gguf_path: Path) -> Path:
    """The folder of one GGUF file's entry: a new path, size or modification time is a new entry."""
    return cache_dir / f"{gguf_path.stem}-{file_key(gguf_path, FORMAT_VERSION)}"


def cached_state(entry: Path, read: Callable[[], tuple[ModelConfig, dict[str, np.ndarray]]]
                 ) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, HF-named f32 tensors) from the entry, or from `read()`, which then fills the entry."""
    from safetensors.numpy import load_file, save_file

    if all((entry / name).is_file() for name in ("state.safetensors", "config.json")):
        fields = json.loads((entry / "config.json").read_text())
        fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
        return ModelConfig(**fields), load_file(entry / "state.safetensors")
    config, state = read()

    def write(tmp: Path) -> None:
        save_file({name: np.ascontiguousarray(array, np.float32) for name, array in state.items()},
                  tmp / "state.safetensors")
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))

    _write_atomically(entry, "state", write)
    return config, state


def cached_tokenizer(entry: Path, convert: Callable[[], Any]) -> Any:
    """The fast tokenizer saved in the entry, or `convert()`'s (saved there for next time)."""
    from transformers import PreTrainedTokenizerFast  # (AutoTokenizer's import also loads torch: +2.5 s)

    if (entry / "no_tokenizer").is_file():
        return None
    if (entry / "tokenizer").is_dir():
        return PreTrainedTokenizerFast.from_pretrained(str(entry / "tokenizer"), local_files_only=True)
    tokenizer = convert()
    if tokenizer is None:
        _write_atomically(entry, "no_tokenizer", lambda tmp: (tmp / "no_tokenizer").touch())
    else:
        _write_atomically(entry, "tokenizer", lambda tmp: tokenizer.save_pretrained(str(tmp / "tokenizer")))
    return tokenizer


def _write_atomically(entry: Path, item: str, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` in a fresh folder, then move what it wrote into `entry` by renames (an
    item another process wrote first is kept)."""
    entry.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{item}-", dir=entry))
    try:
        write(tmp)
        for path in tmp.iterdir():
            try:
                os.rename(path, entry / path.name)
            except OSError:  # already there (a concurrent load wrote it): keep theirs
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
