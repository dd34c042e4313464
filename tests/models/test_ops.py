"""The ops seam (`models/ops.py`): a second ops set swapped in through the engine leaves every logit
unchanged without touching `models/llama.py`; quantized-tensor leaves pass through `linear`/`embed`;
`decoder_layer` is public and composes into `forward`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from continuous_batching.engine import Engine
from continuous_batching.engine_config import KERNEL_SETS, EngineConfig
from continuous_batching.sampling_params import SamplingParams
from models.llama import decoder_layer, forward
from models.ops import OPS_SETS, Ops, get_ops, rope_cos_sin
from quantization.quantized_tensor import QuantizedTensor

SMALL = dict(num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)


@dataclasses.dataclass(frozen=True)
class CountingOps(Ops):
    """The xla ops with a `linear` that counts its calls (at trace time: once per projection per
    compiled program) in a list it owns."""

    name: str = "counting"
    calls: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def linear(self, x, weight):
        self.calls.append(tuple(weight.shape))
        return super().linear(x, weight)


def test_a_second_ops_set_through_the_engine_gives_identical_logprobs(tiny_model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 263, n).tolist() for n in (5, 17, 9)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=20)
    plain = Engine(tiny_model, EngineConfig(**SMALL)).generate(prompts, params, progress=False)
    counting = CountingOps()
    swapped = Engine(tiny_model, EngineConfig(kernels=counting, **SMALL)).generate(prompts, params, progress=False)
    for a, b in zip(plain, swapped):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs  # the raw log-softmax, bit for bit
    per_program = 7 * tiny_model.config.num_layers  # q, k, v, o, gate, up, down
    assert counting.calls and len(counting.calls) % per_program == 0


def test_engine_config_kernel_names_are_the_ops_sets():
    assert set(KERNEL_SETS) == set(OPS_SETS)
    with pytest.raises(ValueError, match="kernels must be one of"):
        EngineConfig(kernels="fused")
    with pytest.raises(ValueError, match="kernels must be one of"):
        get_ops("fused")
    assert get_ops("xla") is OPS_SETS["xla"] and get_ops(CountingOps()).name == "counting"


def quantize_int8(weight: jax.Array, group_size: int = 0) -> QuantizedTensor:
    """Symmetric int8, one scale per group of rows and column (enough to exercise the leaf type)."""
    rows, cols = weight.shape
    group = group_size or rows
    grouped = weight.reshape(rows // group, group, cols)
    scales = jnp.max(jnp.abs(grouped), axis=1) / 127.0  # f32[groups, cols]
    values = jnp.round(grouped / scales[:, None]).astype(jnp.int8).reshape(rows, cols)
    return QuantizedTensor(values, scales, group_size=group_size)


def test_quantized_leaves_pass_through_linear_and_embed(tiny_model):
    params, config = tiny_model.params, tiny_model.config
    tokens = jnp.array([[3, 17, 200, 5, 9]])
    positions = jnp.arange(5)[None]
    quantized = jax.tree_util.tree_map(lambda x: x, params)  # a shallow copy of the tree
    quantized["embed"] = quantize_int8(params["embed"])
    quantized["layers"][0] = dict(params["layers"][0], wq=quantize_int8(params["layers"][0]["wq"]),
                                  w_gate=quantize_int8(params["layers"][0]["w_gate"], group_size=16))
    dequantized = dict(quantized, embed=quantized["embed"].dequantize(),
                       layers=[dict(quantized["layers"][0], wq=quantized["layers"][0]["wq"].dequantize(),
                                    w_gate=quantized["layers"][0]["w_gate"].dequantize()), *params["layers"][1:]])
    run = jax.jit(lambda p: forward(p, tokens, positions, config=config)[0])
    got, want = run(quantized), run(dequantized)
    # the same weights, dequantized inside or outside the program (XLA may fuse the scale into the dot)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    exact = np.asarray(run(params))
    assert np.max(np.abs(np.asarray(got) - exact)) > 0  # the quantized weights did reach the model
    np.testing.assert_allclose(np.asarray(got), exact, atol=0.1 * np.abs(exact).max())


def test_quantized_tensor_checks_its_shapes():
    values = jnp.zeros((8, 4), jnp.int8)
    ragged = QuantizedTensor(values, jnp.ones((3, 4)), group_size=3)  # groups of 3, 3 and 2 rows
    np.testing.assert_array_equal(np.asarray(ragged.dequantize()), np.zeros((8, 4)))
    with pytest.raises(ValueError, match=r"scales must have shape \(3, 4\)"):
        QuantizedTensor(values, jnp.ones((2, 4)), group_size=3)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QuantizedTensor(values, jnp.ones((1, 4)), bits=2)
    with pytest.raises(ValueError, match="scales must have shape"):
        QuantizedTensor(values, jnp.ones((2, 4)), group_size=2)
    with pytest.raises(ValueError, match="zeros must match"):
        QuantizedTensor(values, jnp.ones((4, 4)), jnp.ones((4, 3)), group_size=2)
    asym = QuantizedTensor(values + 3, jnp.full((4, 4), 0.5), jnp.full((4, 4), 1.0), group_size=2)
    np.testing.assert_array_equal(np.asarray(asym.dequantize()), np.ones((8, 4)))
    np.testing.assert_array_equal(np.asarray(asym.take_rows(jnp.array([[1, 7]]))), np.ones((1, 2, 4)))


def test_decoder_layers_called_one_by_one_compose_into_forward(tiny_model):
    """What a pipeline stage does: run a slice of the layers on the (hidden, residual) carry."""
    params, config, ops = tiny_model.params, tiny_model.config, get_ops("xla")
    tokens, positions = jnp.array([[4, 8, 15, 16, 23, 42]]), jnp.arange(6)[None]
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta)
    hidden, residual = ops.embed(params["embed"], tokens), None
    for layer in params["layers"]:
        hidden, residual, _ = decoder_layer(layer, hidden, residual, cos, sin, None, positions, None,
                                            config=config, backend="contiguous", ops=ops)
    x, _ = ops.rms_norm(hidden, params["final_norm"], config.rms_norm_eps, residual)
    head = params["embed"] if config.tie_word_embeddings else params["lm_head"]
    logits = ops.logits(x, head, transposed=config.tie_word_embeddings)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(forward(params, tokens, positions, config=config)[0]))


def test_rope_tables_built_on_the_host_match_the_traced_ones():
    """The runner's host tables (numpy) and the model's traced ones share their f32 angles; only the
    last bits of cos / sin may differ."""
    positions = np.arange(0, 8192, 7, dtype=np.int32)
    host = rope_cos_sin(positions, 64, 10000.0, xp=np)
    traced = jax.jit(lambda p: rope_cos_sin(p, 64, 10000.0))(positions)
    for h, t in zip(host, traced):
        assert h.dtype == np.float32 and h.shape == (len(positions), 64)
        np.testing.assert_allclose(h, np.asarray(t), rtol=0, atol=1e-6)
