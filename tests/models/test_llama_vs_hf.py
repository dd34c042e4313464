"""Our forward pass against HF transformers' LlamaForCausalLM with identical weights (f32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import models
from models.llama import forward
from paged_attention.contiguous import init_kv_cache

ATOL_F32 = 1e-4


def hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def positions_like(tokens: np.ndarray) -> jnp.ndarray:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def test_prefill_logits_match_hf(tiny_model, hf_tiny, rng):
    tokens = rng.integers(0, tiny_model.config.vocab_size, size=(3, 37))
    ours, _ = forward(tiny_model.params, jnp.asarray(tokens), positions_like(tokens), config=tiny_model.config)
    np.testing.assert_allclose(np.asarray(ours), hf_logits(hf_tiny, tokens), atol=ATOL_F32, rtol=0)


def test_token_by_token_decode_with_cache_matches_hf(tiny_model, hf_tiny, rng):
    config = tiny_model.config
    tokens = rng.integers(0, config.vocab_size, size=(2, 23))
    expected = hf_logits(hf_tiny, tokens)  # [2, 23, vocab]
    cache = init_kv_cache(config.num_layers, 2, 32, config.num_kv_heads, config.head_dim)
    step = jax.jit(lambda p, t, pos, c: forward(p, t, pos, c, config=config))
    for t in range(tokens.shape[1]):
        pos = jnp.full((2, 1), t, jnp.int32)
        logits, cache = step(tiny_model.params, jnp.asarray(tokens[:, t:t + 1]), pos, cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), expected[:, t], atol=ATOL_F32, rtol=0,
                                   err_msg=f"decode step {t}")


def test_forward_with_cache_equals_without(tiny_model, rng):
    """A prompt prefilled in two chunks, then decoded, equals one cache-less forward over it all."""
    config = tiny_model.config
    tokens = rng.integers(0, config.vocab_size, size=(2, 29))
    full, _ = forward(tiny_model.params, jnp.asarray(tokens), positions_like(tokens), config=config)
    cache = init_kv_cache(config.num_layers, 2, 64, config.num_kv_heads, config.head_dim)
    pieces = []
    for start, stop in [(0, 11), (11, 28), (28, 29)]:
        chunk = tokens[:, start:stop]
        pos = jnp.asarray(np.broadcast_to(np.arange(start, stop), chunk.shape), jnp.int32)
        logits, cache = forward(tiny_model.params, jnp.asarray(chunk), pos, cache, config=config)
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), np.asarray(full), atol=1e-5, rtol=0)


def test_logits_indices_select_rows(tiny_model, rng):
    config = tiny_model.config
    tokens = rng.integers(0, config.vocab_size, size=(2, 9))
    full, _ = forward(tiny_model.params, jnp.asarray(tokens), positions_like(tokens), config=config)
    picked, _ = forward(tiny_model.params, jnp.asarray(tokens), positions_like(tokens), config=config,
                        logits_indices=jnp.asarray([4, 9 + 8]))
    np.testing.assert_allclose(np.asarray(picked), np.asarray(full)[[0, 1], [4, 8]], atol=1e-6)


def test_bfloat16_forward_close_to_float32(hf_tiny, rng):
    from models.loading import params_from_transformers

    config, p32 = params_from_transformers(hf_tiny, dtype="float32")
    _, p16 = params_from_transformers(hf_tiny, dtype="bfloat16")
    assert p16["embed"].dtype == jnp.bfloat16
    tokens = rng.integers(0, config.vocab_size, size=(2, 17))
    l32, _ = forward(p32, jnp.asarray(tokens), positions_like(tokens), config=config)
    l16, _ = forward(p16, jnp.asarray(tokens), positions_like(tokens), config=config)
    rel = np.linalg.norm(np.asarray(l16) - np.asarray(l32)) / np.linalg.norm(np.asarray(l32))
    assert rel < 2e-2, f"bf16 relative L2 error {rel:.3g} vs f32"


@pytest.mark.parametrize("batch_size", [None, 2])
def test_greedy_generation_equals_hf_greedy(tiny_model, hf_tiny, rng, batch_size):
    """Prompts of different lengths (right-padded by us) give exactly HF's greedy tokens."""
    lengths = [5, 13, 1, 8]
    prompts = [rng.integers(3, tiny_model.config.vocab_size, size=n).tolist() for n in lengths]
    ours = models.generate(tiny_model, prompts, max_new_tokens=12, batch_size=batch_size, ignore_eos=True)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = hf_tiny.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                                   do_sample=False, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()


def test_greedy_generation_equals_hf_left_padded_batch(tiny_model, hf_tiny, rng):
    """HF's own batched generate (left padding + attention mask) agrees with our right padding."""
    lengths = [7, 3, 11]
    prompts = [rng.integers(3, tiny_model.config.vocab_size, size=n).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf_tiny.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
                               do_sample=False, pad_token_id=0)
    ours = models.generate(tiny_model, prompts, max_new_tokens=10, ignore_eos=True)
    assert ours == out[:, width:].tolist()
