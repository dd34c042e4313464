"""Calibration for the quantization schemes that need activation statistics (SmoothQuant's smoothing,
static per-tensor activation scales, GPTQ's Hessians, AWQ's salience): run the unquantized model
eagerly on calibration text and record, for every projection, what its input saw
(`quantization.ActivationStats`: per-channel absmax and mean |x|, and the Hessian x^T x on request).

The text is ShareGPT prompts (`calibration_windows`), never the perplexity text. The recording
is an ops set (the model's seam): its `linear` looks the weight up by identity in the params tree
and merges that projection's statistics, then multiplies as the xla set does. Eager on purpose:
the values are concrete, so the statistics are plain numpy.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

import models
from experiments.datasets import sharegpt_pairs
from models.llama import forward
from models.ops import Ops
from quantization.activation_stats import ActivationStats
from quantization.kv_int8 import fold_kv_scales
from quantization.schemes import PROJECTIONS


@dataclasses.dataclass(frozen=True)
class RecordingOps(Ops):
    """The xla ops, with a `linear` that records each named weight's input statistics."""

    name: str = "recording"
    names: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)  # id(weight) -> key
    stats: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)  # key -> ActivationStats
    hessian: bool = False
    last: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)  # the last input and its stats

    def linear(self, x, weight):
        key = self.names.get(id(weight))
        if key is not None:
            if self.last.get("x") is not x:  # q, k and v (gate and up) read one input: its stats once
                self.last.update(x=x, stats=ActivationStats.of(x, hessian=self.hessian))
            seen = self.last["stats"]
            self.stats[key] = self.stats[key].merged(seen) if key in self.stats else seen
        return super().linear(x, weight)


def encode(model: models.Model, text: str) -> list[int]:
    """text as the model's token ids (a model without a tokenizer: the text's bytes as ids)."""
    if model.tokenizer is not None:
        return model.tokenizer(text).input_ids
    return [b % model.config.vocab_size for b in text.encode("utf-8")]


def prompt_token_ids(model: models.Model, num_tokens: int) -> list[int]:
    """The first `num_tokens` tokens of the ShareGPT prompts in file order, tokenized and joined."""
    ids: list[int] = []
    for prompt, _ in sharegpt_pairs():
        ids += encode(model, prompt)
        if len(ids) >= num_tokens:
            break
    return ids[:num_tokens]


CALIBRATION_WINDOW = 256  # tokens per calibration window


def calibration_windows(model: models.Model, num_windows: int, window: int = CALIBRATION_WINDOW) -> np.ndarray:
    """i32[num_windows, window]: the ShareGPT prompt tokens (`prompt_token_ids`) cut into windows of
    equal length, so one eager forward pass covers them all (each op compiles once, for one shape).
    The tokens after them are held out (`held_out_prompt_ids`)."""
    ids = prompt_token_ids(model, num_windows * window)
    return np.asarray(ids, np.int32).reshape(num_windows, window)


def held_out_prompt_ids(model: models.Model, calibration_tokens: int, num_tokens: int) -> list[int]:
    """`num_tokens` ShareGPT prompt tokens that follow the first `calibration_tokens` (which
    calibration reads): text of the calibration domain that no scheme was fitted on."""
    return prompt_token_ids(model, calibration_tokens + num_tokens)[calibration_tokens:]


def activation_stats(model: models.Model, tokens, hessian: bool = False) -> dict[str, ActivationStats]:
    """{"layers.{i}.{name}": ActivationStats}: what each projection's input saw over every token of
    `tokens` i32[batch, length] (one eager forward pass, each row a sequence of its own); with
    `hessian`, also x^T x (GPTQ, AWQ)."""
    names = {id(layer[key]): f"layers.{i}.{key}" for i, layer in enumerate(model.params["layers"])
             for key in PROJECTIONS if key in layer}
    ops = RecordingOps(names=names, hessian=hessian)
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    forward(model.params, tokens, positions, config=model.config, ops=ops)
    missing = sorted(set(names.values()) - set(ops.stats))
    if missing:
        raise RuntimeError(f"calibration saw no input for {missing[:3]} (and {max(0, len(missing) - 3)} more)")
    return ops.stats


@dataclasses.dataclass(frozen=True)
class KVRecordingOps(Ops):
    """The xla ops, with a `qkv_rope` that records each layer's per-KV-head absmax of K (after RoPE)
    and V, the values an INT8 KV cache stores."""

    name: str = "kv-recording"
    layers: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)  # id(wk) -> layer index
    absmax: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)  # index -> f32[2, kv_heads]

    def qkv_rope(self, x, layer, cos, sin, *, config):
        q, k, v = super().qkv_rope(x, layer, cos, sin, config=config)
        lead = tuple(range(k.ndim - 2))  # k, v [*lead, kv_heads, head_dim]: max over all but the head
        seen = np.stack([np.asarray(jnp.abs(t).max(axis=(*lead, k.ndim - 1))) for t in (k, v)])
        i = self.layers[id(layer["wk"])]
        self.absmax[i] = np.maximum(self.absmax[i], seen) if i in self.absmax else seen
        return q, k, v


def kv_absmax(model: models.Model, tokens) -> tuple[np.ndarray, np.ndarray]:
    """(K absmax, V absmax), each f32[num_layers, kv_heads]: the largest |K| (after RoPE) and |V| per
    layer and KV head over `tokens` i32[batch, length] (one eager forward pass), what
    `quantization.kv_int8.fold_kv_scales` turns into an INT8 KV cache's scales."""
    ops = KVRecordingOps(layers={id(layer["wk"]): i for i, layer in enumerate(model.params["layers"])})
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    forward(model.params, tokens, positions, config=model.config, ops=ops)
    absmax = np.stack([ops.absmax[i] for i in range(len(model.params["layers"]))])  # f32[layers, 2, kv_heads]
    return absmax[:, 0], absmax[:, 1]


KV_CALIBRATION_WINDOWS = 16  # scaled KV caches: 256-token ShareGPT windows whose K / V absmax sets the scales


def with_calibrated_kv_scales(model: models.Model, cache_dtype: str,
                              num_windows: int = KV_CALIBRATION_WINDOWS) -> models.Model:
    """The model with per-layer, per-KV-head K / V scales for a `cache_dtype` cache folded into its
    weights (`quantization.kv_int8.fold_kv_scales`), from the absmax over the first `num_windows`
    calibration windows; its logits are the same on a float cache."""
    absmax = kv_absmax(model, calibration_windows(model, num_windows))
    return dataclasses.replace(model, params=fold_kv_scales(model.params, model.config, *absmax,
                                                            cache_dtype=cache_dtype))
