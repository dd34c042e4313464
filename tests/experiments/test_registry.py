"""One registry of engines: every run config's `engine` tag names a registered class, and every
registered class imports (the registry imports the engines, never the reverse)."""

from __future__ import annotations

import importlib

import pytest

from experiments.config import RUN_CONFIG_BY_ENGINE
from experiments.engines import ENGINES


def test_every_config_engine_is_registered_and_nothing_else():
    assert set(RUN_CONFIG_BY_ENGINE) == set(ENGINES) - {"llama-cpp-parallel"}  # llama-cpp with parallel > 1


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_every_registered_engine_class_exists(name):
    module, cls = ENGINES[name].split(":")
    try:
        loaded = importlib.import_module(module)
    except ImportError as missing:  # an optional baseline's package (llama-cpp-python) is not installed
        pytest.skip(f"optional dependency missing: {missing}")
    assert isinstance(getattr(loaded, cls), type)
