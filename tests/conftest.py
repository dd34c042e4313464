"""Shared fixtures: seeded tiny models (ours and HF's with identical weights) and the real SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("INFER_LAB_COMPILATION_CACHE", "off")  # harness runs in tests leave ~/.cache alone
os.environ.setdefault("INFER_LAB_MODEL_CACHE", "off")  # every test converts its GGUF files afresh
os.environ.setdefault("INFER_LAB_DATASET_CACHE", "off")  # and parses its datasets afresh

import numpy as np
import pytest

import models
from models.config import PRESETS
from models.loading import params_from_transformers


@pytest.fixture(scope="session")
def hf_tiny():
    """A transformers LlamaForCausalLM of the `tiny` shape with seeded, non-trivial weights."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(PRESETS["tiny"].to_hf("eager")).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:  # away from all-ones so a misplaced norm weight shows
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:  # larger than HF's 0.02 init so logits are far from uniform
                p.copy_(0.15 * torch.randn_like(p))
    return hf_model


@pytest.fixture(scope="session")
def tiny_model(hf_tiny) -> models.Model:
    """Our model holding exactly hf_tiny's weights."""
    config, params = params_from_transformers(hf_tiny)
    return models.Model(PRESETS["tiny"], params)


@pytest.fixture(scope="session")
def smollm2() -> models.Model:
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to f32) with its tokenizer."""
    return models.load("smollm2-135m")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
