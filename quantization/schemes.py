"""`quantize_params(params, scheme)`: a model's params tree with its projection weights quantized.

Scheme names (`parse_scheme`):

    none                  the params unchanged
    int8                  int8 weight-only, one scale per output channel, symmetric
    int8-asym             the same with a zero point per channel
    int4-g32 / -g64 / -g128   int4 weight-only, one scale per 32 / 64 / 128 input rows and output
                          column (two codes per byte); append -asym for a zero point per group
    w8a8, w8a8-smooth, w8a8-tensor, w8a8-tensor-smooth
                          int8 x int8 matmuls (`quantization/w8a8.py`): per-token or static
                          per-tensor activation scales, with or without SmoothQuant smoothing
    gptq-int4-g{32,64,128}[-act]   GPTQ (`quantization/gptq.py`), symmetric int4 groups
    awq-int4-g{32,64,128}     AWQ (`quantization/awq.py`), asymmetric int4 groups, scales folded
                          into the norms (the one scheme that changes non-projection leaves)
    fp8-e4m3, fp8-e4m3-tensor FP8 E4M3 weights (`quantization/fp8.py`), per-channel / per-tensor scales

The seven projections of every layer (and the fused `wqkv` / `w_gate_up` when present) become
`QuantizedTensor` (weight-only) or `W8A8Tensor` leaves; norms stay in their float dtype, and so do the
embedding table and the LM head, as GPTQ / AWQ checkpoints and TensorRT-LLM's weight-only mode keep
them, except that the 4-bit schemes (`EMBEDDING_Q8_0_SCHEMES`) keep a tied embedding table as Q8_0
blocks, as llama.cpp's 4-bit files do (`quantization/quantized_embedding.py`).
The model code is unchanged: its `linear` op accepts the quantized leaves.
"""

from __future__ import annotations

import dataclasses
import re

from quantization.quantized_tensor import QuantizedTensor
from quantization.awq import awq_params
from quantization.quantized_embedding import quantize_embedding
from quantization.fp8 import quantize_fp8
from quantization.gptq import gptq_quantize
from quantization.scheme_names import (AWQ_SCHEMES, CALIBRATED_SCHEMES, EMBEDDING_Q8_0_SCHEMES, FP8_SCHEMES,
                                       GPTQ_SCHEMES, HESSIAN_SCHEMES, SCHEME_NAMES, W8A8_SCHEMES)
from quantization.w8a8 import W8A8Tensor, quantize_w8a8
from quantization.weight_only import quantize_weight

SMOOTH_ALPHA = 0.5  # SmoothQuant's default migration strength

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


def parse_scheme(name: str) -> WeightOnlyScheme | str | None:
    """A scheme name -> its settings (None for `none`, the name itself for a W8A8 or FP8 scheme); a
    clear error naming the allowed names."""
    if name not in SCHEME_NAMES:
        raise ValueError(f"quantization must be one of {list(SCHEME_NAMES)}, got {name!r}")
    if name == "none" or name in W8A8_SCHEMES or name in FP8_SCHEMES:
        return None if name == "none" else name
    if name in HESSIAN_SCHEMES:
        return WeightOnlyScheme(4, int(re.search(r"-g(\d+)", name)[1]), name in GPTQ_SCHEMES)
    match = re.fullmatch(r"int(8|4)(?:-g(\d+))?(-asym)?", name)
    return WeightOnlyScheme(int(match[1]), int(match[2] or 0), match[3] is None)


def _quantizer(scheme: str, settings, calibration):
    """(layer index, projection name, weight) -> its quantized leaf."""
    if scheme in FP8_SCHEMES:
        return lambda index, name, w: quantize_fp8(w, per_channel=scheme == "fp8-e4m3", scale_dtype=w.dtype)
    if scheme in GPTQ_SCHEMES:
        return lambda index, name, w: gptq_quantize(w, _stats(calibration, index, name).hessian, settings.bits,
                                                     settings.group_size, settings.symmetric,
                                                     act_order=scheme.endswith("-act"))
    if isinstance(settings, WeightOnlyScheme):
        return lambda index, name, w: quantize_weight(w, settings.bits, settings.group_size, settings.symmetric,
                                                      scale_dtype=w.dtype)
    smooth_alpha = SMOOTH_ALPHA if scheme.endswith("-smooth") else None
    per_tensor = scheme.startswith("w8a8-tensor")

    def quantize(index, name, w):
        return quantize_w8a8(w, None if calibration is None else _stats(calibration, index, name).absmax,
                             smooth_alpha=smooth_alpha, per_tensor=per_tensor)
    return quantize


def _stats(calibration: dict, index: int, name: str):
    key = f"layers.{index}.{name}"
    if key not in calibration:
        raise ValueError(f"calibration has no activation statistics for {key}")
    return calibration[key]


def quantize_params(params: dict, scheme: str, calibration: dict | None = None) -> dict:
    """params with every layer's projections quantized by `scheme` (see the module docstring).
    `calibration`: for the calibrated schemes (`CALIBRATED_SCHEMES`), what each projection's input
    saw, `{"layers.{i}.{name}": ActivationStats}` (experiments/quant_calibration.py collects it,
    with Hessians for `HESSIAN_SCHEMES`); the other schemes take none."""
    settings = parse_scheme(scheme)
    if scheme in CALIBRATED_SCHEMES and calibration is None:
        raise ValueError(f"quantization {scheme!r} needs calibration: each projection input's statistics")
    if scheme not in CALIBRATED_SCHEMES and calibration is not None:
        raise ValueError(f"quantization {scheme!r} takes no calibration data")
    if settings is None:
        return params
    if scheme in AWQ_SCHEMES:
        return quantize_embedding(awq_params(params, calibration, settings.bits, settings.group_size,
                                             settings.symmetric))
    quantize = _quantizer(scheme, settings, calibration)
    layers = []
    for index, layer in enumerate(params["layers"]):
        layer = dict(layer)
        for name in PROJECTIONS:
            if name not in layer:
                continue
            if isinstance(layer[name], (QuantizedTensor, W8A8Tensor)):
                raise ValueError(f"layers[{index}].{name} is already quantized")
            layer[name] = quantize(index, name, layer[name])
        layers.append(layer)
    quantized = {**params, "layers": layers}
    return quantize_embedding(quantized) if scheme in EMBEDDING_Q8_0_SCHEMES else quantized
