"""Weight loading: HF checkpoint folders (safetensors), GGUF files, and their error messages."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import models
from models.config import PRESETS
from models.gguf_loading import load_gguf, unpermute_rope_rows
from models.llama import forward
from models.loading import CheckpointError, load_hf_checkpoint, params_to_hf_state_dict, save_hf_checkpoint


def assert_params_equal(a, b, atol=0.0):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for path, x, y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(a),
                          jax.tree_util.tree_leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype, path[0]
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=str(path[0]))


@pytest.fixture
def saved(tiny_model, tmp_path):
    return save_hf_checkpoint(tiny_model.params, tiny_model.config, tmp_path / "tiny-ckpt")


def test_save_then_load_round_trips_exactly(tiny_model, saved):
    config, params = load_hf_checkpoint(saved)
    assert config == tiny_model.config.replace(name="tiny-ckpt")
    assert_params_equal(params, tiny_model.params)


def test_load_bfloat16(tiny_model, saved):
    _, params = load_hf_checkpoint(saved, dtype="bfloat16")
    assert params["layers"][0]["wq"].dtype == jnp.bfloat16
    expected = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), tiny_model.params)
    assert_params_equal(params, expected)


def test_transformers_reads_our_checkpoint(tiny_model, saved, rng):
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(saved, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = rng.integers(0, tiny_model.config.vocab_size, size=(2, 19))
    with torch.no_grad():
        expected = hf_model(torch.as_tensor(tokens)).logits.numpy()
    positions = jnp.broadcast_to(jnp.arange(19, dtype=jnp.int32), tokens.shape)
    ours, _ = forward(tiny_model.params, jnp.asarray(tokens), positions, config=tiny_model.config)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)


def test_models_load_folder(tiny_model, saved):
    model = models.load(saved)
    assert model.tokenizer is None
    assert model.dtype == "float32"
    assert model.config.num_layers == tiny_model.config.num_layers
    assert_params_equal(model.params, tiny_model.params)


def rewrite_weights(folder, edit):
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    name = "model.layers.2.mlp.up_proj.weight"
    rewrite_weights(saved, lambda s: s.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        models.load(saved)


def test_wrong_shape_names_tensor_and_both_shapes(saved):
    name = "model.layers.1.self_attn.k_proj.weight"  # expected (2 * 14, 48)
    rewrite_weights(saved, lambda s: s.__setitem__(name, np.zeros((30, 48), np.float32)))
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(saved)
    message = str(err.value)
    assert name in message and "(30, 48)" in message and "(28, 48)" in message


def test_tied_checkpoint_ignores_stored_duplicate_head(tmp_path):
    config = PRESETS["tiny"].replace(tie_word_embeddings=True)
    params = models.init_params(config, seed=1)
    folder = save_hf_checkpoint(params, config, tmp_path / "tied")
    rewrite_weights(folder, lambda s: s.__setitem__("lm_head.weight", s["model.embed_tokens.weight"]))
    loaded_config, loaded = load_hf_checkpoint(folder)
    assert loaded_config.tie_word_embeddings and "lm_head" not in loaded
    assert_params_equal(loaded, params)


def test_unsupported_architecture_in_config_json(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM"):
        models.load(saved)


def test_load_unknown_source_lists_presets():
    with pytest.raises(ValueError, match="nonexistent") as err:
        models.load("nonexistent")
    for name in PRESETS:
        assert name in str(err.value)


def test_load_bad_dtype_lists_allowed():
    with pytest.raises(ValueError, match="float16") as err:
        models.load("tiny", dtype="float16")
    assert "float32" in str(err.value) and "bfloat16" in str(err.value)


# ----- GGUF ---------------------------------------------------------------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's q/k row permutation (the reference)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head, head_dim, cols", [(9, 64, 5), (3, 14, 7), (1, 2, 3)])
def test_unpermute_rope_rows_inverts_llama_cpp(n_head, head_dim, cols, rng):
    w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w) or head_dim == 2
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, n_head), w)
    np.testing.assert_array_equal(llama_cpp_permute(unpermute_rope_rows(w, n_head), n_head), w)


HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}


def write_gguf(path, params, config, *, matrix_dtype=np.float32, file_type=None, toy_vocab=False):
    """A llama.cpp-style GGUF file of these params: matrices stored as `matrix_dtype` (norms F32),
    optionally a `file_type` field and a toy vocab (`t0`, `t1`, ...; none by default)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_ids[0])
    if file_type is not None:
        writer.add_file_type(file_type)
    if toy_vocab:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
        writer.add_token_merges(["t 0"])  # llama.cpp refuses a BPE vocab without merges
    for name, array in params_to_hf_state_dict(params, config).items():
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            module = ".".join(rest[:-1])
            if module == "self_attn.q_proj":
                array = llama_cpp_permute(array, config.num_heads)
            elif module == "self_attn.k_proj":
                array = llama_cpp_permute(array, config.num_kv_heads)
            name = f"blk.{i}.{LAYER_TO_GGUF[module]}.weight"
        else:
            name = HF_TO_GGUF[name]
        array = np.ascontiguousarray(array, matrix_dtype if array.ndim == 2 else np.float32)
        writer.add_tensor(name, array)  # numpy [out, in] order
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_writer_stores_shapes_reversed(tmp_path, tiny_model):
    import gguf

    path = write_gguf(tmp_path / "tiny.gguf", tiny_model.params, tiny_model.config)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert [int(n) for n in tensors["blk.0.attn_k.weight"].shape] == [48, 28]  # [in, out]
    assert len(tensors) == 2 + 1 + 9 * tiny_model.config.num_layers


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_round_trip(tmp_path, tiny_model, tied):
    config = tiny_model.config.replace(tie_word_embeddings=tied)
    params = dict(tiny_model.params)
    if tied:
        params.pop("lm_head")
    path = write_gguf(tmp_path / "tiny.gguf", params, config)
    loaded_config, loaded = load_gguf(path)
    # GGUF stores rms_norm_eps as float32; the loader recovers the decimal that was meant (1e-05)
    assert loaded_config.rms_norm_eps == config.rms_norm_eps
    assert loaded_config == config.replace(name="tiny")
    assert_params_equal(loaded, params)
    via_load = models.load(path, tokenizer=False)
    assert via_load.tokenizer is None
    assert_params_equal(via_load.params, params)


def test_gguf_without_tokenizer_loads_with_tokenizer_none(tmp_path, tiny_model):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model.params, tiny_model.config)
    assert models.load(path).tokenizer is None


def test_gguf_model_cache_serves_the_second_load(tmp_path, tiny_model, monkeypatch):
    """The first load fills the cache entry; the second reads it without parsing the file, and
    gives the same config and params. A rewritten file (new size or time) is a new entry."""
    import gguf

    from models.load_cache import entry_dir

    monkeypatch.setenv("INFER_LAB_MODEL_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model.params, tiny_model.config)
    first = models.load(path)
    entry = entry_dir(tmp_path / "cache", path)
    assert sorted(p.name for p in entry.iterdir()) == ["config.json", "no_tokenizer", "state.safetensors"]

    def no_parse(*args, **kwargs):
        raise AssertionError("the cached load parsed the GGUF file")

    monkeypatch.setattr(gguf, "GGUFReader", no_parse)
    second = models.load(path)
    assert second.config == first.config == tiny_model.config.replace(name="tiny")
    assert second.tokenizer is None
    assert_params_equal(second.params, tiny_model.params)
    monkeypatch.undo()
    monkeypatch.setenv("INFER_LAB_MODEL_CACHE", str(tmp_path / "cache"))
    write_gguf(path, {**tiny_model.params, "final_norm": tiny_model.params["final_norm"] * 2}, tiny_model.config)
    assert entry_dir(tmp_path / "cache", path) != entry
    assert_params_equal(models.load(path).params["final_norm"], tiny_model.params["final_norm"] * 2)


def test_model_cache_off(monkeypatch):
    from models.load_cache import default_model_cache_dir

    monkeypatch.setenv("INFER_LAB_MODEL_CACHE", "off")
    assert default_model_cache_dir() is None
    monkeypatch.setenv("INFER_LAB_MODEL_CACHE", "/some/dir")
    assert str(default_model_cache_dir()) == "/some/dir"
