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
