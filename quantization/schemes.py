"""`quantize_params(params, scheme)`: a model's params tree with its projection weights quantized.

Scheme names (`parse_scheme`):

    none                  the params unchanged
    int8                  int8 weight-only, one scale per output channel, symmetric
    int8-asym             the same with a zero point per channel
    int4-g32 / -g64 / -g128   int4 weight-only, one scale per 32 / 64 / 128 input rows and output
                          column (two codes per byte); append -asym for a zero point per group

The seven projections of every layer (and the fused `wqkv` / `w_gate_up` when present) become
`QuantizedTensor` leaves; norms, the embedding table and the LM head stay in their float dtype, as
GPTQ / AWQ checkpoints and TensorRT-LLM's weight-only mode keep them. The model code is unchanged:
its `linear` op accepts the quantized leaf.
"""

from __future__ import annotations

import dataclasses
import re

from quantization.quantized_tensor import QuantizedTensor
from quantization.scheme_names import SCHEME_NAMES
from quantization.weight_only import quantize_weight

PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "wqkv", "w_gate_up")


@dataclasses.dataclass(frozen=True)
class WeightOnlyScheme:
    bits: int
    group_size: int  # 0: per output channel
    symmetric: bool

    @property
    def name(self) -> str:
        group = f"-g{self.group_size}" if self.group_size else ""
        return f"int{self.bits}{group}{'' if self.symmetric else '-asym'}"


def parse_scheme(name: str) -> WeightOnlyScheme | None:
    """A scheme name -> its settings (None for `none`); a clear error naming the allowed names."""
    match = re.fullmatch(r"int(8|4)(?:-g(\d+))?(-asym)?", name)
    if name != "none" and (match is None or name not in SCHEME_NAMES):
        raise ValueError(f"quantization must be one of {list(SCHEME_NAMES)}, got {name!r}")
    if name == "none":
        return None
    return WeightOnlyScheme(int(match[1]), int(match[2] or 0), match[3] is None)


def quantize_params(params: dict, scheme: str, calibration=None) -> dict:
    """params with every layer's projections quantized by `scheme` (see the module docstring).
    `calibration` is for the calibrated schemes; the weight-only ones take none."""
    settings = parse_scheme(scheme)
    if calibration is not None:
        raise ValueError(f"quantization {scheme!r} takes no calibration data")
    if settings is None:
        return params
    layers = []
    for index, layer in enumerate(params["layers"]):
        layer = dict(layer)
        for name in PROJECTIONS:
            if name not in layer:
                continue
            if isinstance(layer[name], QuantizedTensor):
                raise ValueError(f"layers[{index}].{name} is already quantized")
            layer[name] = quantize_weight(layer[name], settings.bits, settings.group_size, settings.symmetric,
                                          scale_dtype=layer[name].dtype)
        layers.append(layer)
    return {**params, "layers": layers}
