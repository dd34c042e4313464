"""GGUF files written from our blocks: the bytes are `quantize_blocks`' (so llama-quantize's), the
metadata is the source's, and llama.cpp runs the file computing with the weights our model uses.
Marked slow (left out of .ci/run to keep CI within its time budget): each writes the whole real
model (~200 MB) and runs it; `python -m pytest tests/quantization/test_gguf_export.py` runs them."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from models.llama import forward
from models.model import find_packaged_gguf
from quantization.ggml_formats import quantize_blocks
from quantization.ggml_params import round_through_blocks
from quantization.gguf_export import LINEAR_WEIGHT, write_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def q4_0_file(tmp_path_factory):
    source = find_packaged_gguf("smollm2-135m")
    dest, counts = write_gguf(source, tmp_path_factory.mktemp("gguf") / "smollm2.Q4_0.gguf", "Q4_0")
    return source, dest, counts


def test_linear_weights_are_our_blocks_the_embedding_q8_0_and_the_rest_f32(q4_0_file):
    source, dest, counts = q4_0_file
    assert counts == {"Q4_0": 7 * 30, "Q8_0": 1, "F32": 61}
    before, after = gguf.GGUFReader(source), gguf.GGUFReader(dest)
    types = gguf.GGMLQuantizationType
    for a, b in zip(before.tensors, after.tensors, strict=True):
        assert (a.name, list(a.shape)) == (b.name, list(b.shape))
        expected = types.Q4_0 if LINEAR_WEIGHT.fullmatch(a.name) else types.F32
        if a.name == "token_embd.weight":  # a 4-bit format keeps the tied embedding in Q8_0: the shipped blocks
            expected = types.Q8_0
            np.testing.assert_array_equal(np.asarray(b.data), np.asarray(a.data))
        assert b.tensor_type == expected, a.name
    down = next(t for t in before.tensors if t.name == "blk.7.ffn_down.weight")
    rows = gguf.quants.dequantize(down.data, down.tensor_type)  # f32[576, 1536]
    written = next(t for t in after.tensors if t.name == "blk.7.ffn_down.weight")
    np.testing.assert_array_equal(np.asarray(written.data).reshape(-1), quantize_blocks(rows, "Q4_0").reshape(-1))
    skip = ("GGUF.", "general.file_type")
    fields = lambda r: {k: f.contents() for k, f in r.fields.items() if not k.startswith(skip)}
    assert fields(after) == fields(before)
    assert after.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0


def test_llama_cpp_computes_with_the_weights_our_model_rounds_to(q4_0_file, smollm2):
    """llama.cpp on our Q4_0 file vs our model on the same weights rounded through Q4_0
    (`round_through_blocks`): close, and ten times closer than either is to the unrounded base.
    (Not equal: llama.cpp's Q4_0 dot also rounds the activations to Q8_0 blocks.)"""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is the oracle: pip install -e '.[llama-cpp]'")
    _, dest, _ = q4_0_file
    model = smollm2
    tokens = model.tokenizer("The quick brown fox jumps over the lazy dog because it was").input_ids
    llm = llama_cpp.Llama(str(dest), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
    llm.eval(tokens)
    theirs = np.asarray(llm.scores[:len(tokens)])  # f32[tokens, vocab]
    run = lambda params: np.asarray(forward(params, jnp.asarray([tokens]), jnp.arange(len(tokens))[None],
                                            config=model.config)[0][0])
    rounded, base = run(round_through_blocks(model.params, "Q4_0")[0]), run(model.params)
    gap_rounded, gap_base = np.abs(rounded - theirs).mean(), np.abs(base - theirs).mean()
    print(f"mean |logit gap| to llama.cpp Q4_0: our Q4_0-rounded model {gap_rounded:.3f}, our base {gap_base:.3f}")
    assert gap_rounded < 0.15 * gap_base
    assert (rounded.argmax(-1) == theirs.argmax(-1)).mean() >= 0.75
