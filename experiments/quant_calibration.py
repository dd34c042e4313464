"""Calibration for the quantization schemes that need activation statistics (SmoothQuant's smoothing,
static per-tensor activation scales): run the unquantized model eagerly on calibration text and
record, for every projection, the largest |x| each of its input channels sees.

The text is ShareGPT prompts (`calibration_windows`), never the perplexity text. The recording
is an ops set (the model's seam): its `linear` looks the weight up by identity in the params tree
and updates that projection's running max, then multiplies as the xla set does. Eager on purpose:
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
from quantization.schemes import PROJECTIONS


@dataclasses.dataclass(frozen=True)
class RecordingOps(Ops):
    """The xla ops, with a `linear` that records each named weight's input absmax per channel."""

    name: str = "recording"
    names: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)  # id(weight) -> key
    absmax: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)  # key -> f32[in]

    def linear(self, x, weight):
        key = self.names.get(id(weight))
        if key is not None:
            seen = np.abs(np.asarray(x, np.float32)).reshape(-1, x.shape[-1]).max(axis=0)
            self.absmax[key] = np.maximum(self.absmax.get(key, seen), seen)
        return super().linear(x, weight)


def calibration_windows(model: models.Model, num_windows: int, window: int = 256) -> np.ndarray:
    """i32[num_windows, window]: ShareGPT prompts in file order, tokenized (a model without a
    tokenizer: the text's bytes as ids), joined and cut into windows of equal length, so one
    eager forward pass covers them all (each op compiles once, for one shape)."""
    ids: list[int] = []
    for prompt, _ in sharegpt_pairs():
        ids += model.tokenizer(prompt).input_ids if model.tokenizer is not None else [
            b % model.config.vocab_size for b in prompt.encode("utf-8")]
        if len(ids) >= num_windows * window:
            break
    return np.asarray(ids[:num_windows * window], np.int32).reshape(num_windows, window)


def activation_absmax(model: models.Model, tokens) -> dict[str, np.ndarray]:
    """{"layers.{i}.{name}": f32[in]}: each projection input's max |x| per channel over every token
    of `tokens` i32[batch, length] (one eager forward pass, each row a sequence of its own)."""
    names = {id(layer[key]): f"layers.{i}.{key}" for i, layer in enumerate(model.params["layers"])
             for key in PROJECTIONS if key in layer}
    ops = RecordingOps(names=names)
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    forward(model.params, tokens, positions, config=model.config, ops=ops)
    missing = sorted(set(names.values()) - set(ops.absmax))
    if missing:
        raise RuntimeError(f"calibration saw no input for {missing[:3]} (and {max(0, len(missing) - 3)} more)")
    return {key: jnp.asarray(value) for key, value in ops.absmax.items()}
