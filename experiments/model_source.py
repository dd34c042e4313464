"""A model source's config without its weights, so the harness can check a run config against the
model (`experiments.config.check_against_model`) before the slow load. Kept apart from
`experiments/config.py`, which imports no JAX: reading a GGUF's metadata goes through `models`."""

from __future__ import annotations

import json
from pathlib import Path


def read_model_config(source: str):
    """The `models.config.ModelConfig` of a model source without loading its weights: a preset's
    config, a HF checkpoint folder's config.json, or a .gguf file's metadata. None when the source is
    none of these (`models.load` then names the problem)."""
    from models.config import PRESETS, ModelConfig

    if source in PRESETS:
        return PRESETS[source]
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelConfig.from_hf(json.loads((path / "config.json").read_text()), name=path.name)
    if path.suffix == ".gguf" and path.is_file():
        import gguf

        from models.gguf_loading import config_from_gguf

        return config_from_gguf(gguf.GGUFReader(path), name=path.stem)
    return None
