"""AWQ (Lin et al., 2023; MIT-HAN-lab's `llm-awq`, AutoAWQ): before rounding, scale up the weight rows
of the input channels that carry large activations, and scale those activations down by the same
factor in the op that produces them, so the product is unchanged and the salient weights round
with relatively less error.

    params = awq_params(params, calibration, bits=4, group_size=128)

For a group of projections that read one input x (q / k / v; gate / up; down; and o when the
attention has as many kv heads as heads), with s f32[in]:

    x @ W  =  (x / s) @ (diag(s) W)      quantize diag(s) W; fold 1 / s into the producer of x:
        q / k / v: the attention RMSNorm weight     gate / up: the MLP RMSNorm weight
        down: the up projection's columns (silu(g) * u / s = act / s)   o: v's columns

s = mean|x|^alpha, normalized by sqrt(max(s) min(s)); alpha from a grid of 20 in [0, 1), the one
whose quantized weights give the least output error over the calibration tokens, tr(dW^T H dW)
with H = sum x^T x (`ActivationStats.output_error`: exact, where llm-awq re-runs the block on the
samples and qwix weights the error by mean|x| alone). alpha = 0 is plain round-to-nearest, so AWQ
never does worse on the calibration data. Not ported: llm-awq's second step, the clipping-range
search per group. GQA attention (SmolLM2: 3 kv heads for 9 heads) leaves o unscaled, as llm-awq
does. Codes and scales follow `weight_only.py`; AutoAWQ's default is asymmetric (a zero point).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from quantization.activation_stats import ActivationStats
from quantization.weight_only import quantize_weight

GRID = 20
MIN_SCALE = 1e-4


def search_scales(weights: list, stats: ActivationStats, bits: int, group_size: int,
                  symmetric: bool) -> tuple[np.ndarray, float]:
    """(s f32[in], alpha) minimizing the output error of the weights [in, out_k] that read one input."""
    w = np.concatenate([np.asarray(x, np.float32) for x in weights], axis=1)  # f32[in, sum out_k]
    best = (np.inf, None, None)
    for alpha in np.arange(GRID) / GRID:
        s = np.maximum(np.power(np.maximum(stats.mean_abs, MIN_SCALE), alpha), MIN_SCALE)
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        q = quantize_weight(jnp.asarray(w * s[:, None]), bits, group_size, symmetric)
        error = stats.output_error(np.asarray(q.dequantize(jnp.float32)) / s[:, None] - w)
        if error < best[0]:
            best = (error, s, float(alpha))
    return best[1], best[2]


def awq_params(params: dict, calibration: dict, bits: int, group_size: int, symmetric: bool = False) -> dict:
    """params with every layer's projections AWQ-scaled and quantized (QuantizedTensor) and the
    inverse scales folded into the norms / producing projections. `calibration`:
    `{"layers.{i}.{name}": ActivationStats}` with Hessians (experiments/quant_calibration.py)."""
    layers = []
    for index, layer in enumerate(params["layers"]):
        layer = dict(layer)
        if "wqkv" in layer:
            raise ValueError(f"layers[{index}]: awq runs on the model's separate projections, not fused params")
        groups = [(("wq", "wk", "wv"), "attn_norm"), (("w_gate", "w_up"), "mlp_norm"), (("w_down",), "w_up")]
        if layer["wv"].shape[1] == layer["wo"].shape[0]:  # one kv head per head: v's columns feed o's rows
            groups.append((("wo",), "wv"))
        scaled = {}
        for names, producer in groups:
            key = f"layers.{index}.{names[0]}"
            if key not in calibration or calibration[key].hessian is None:
                raise ValueError(f"awq needs calibration statistics with a Hessian for {key}")
            s, _ = search_scales([layer[n] for n in names], calibration[key], bits, group_size, symmetric)
            for name in names:
                scaled[name] = layer[name] * jnp.asarray(s, layer[name].dtype)[:, None]
            producer_weight = scaled.get(producer, layer[producer])
            # a norm weight [in] scales its output channel-wise, a projection [*, in] its columns:
            # both broadcast over the last axis
            scaled[producer] = producer_weight * jnp.asarray(1.0 / s, producer_weight.dtype)
        for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            layer[name] = quantize_weight(scaled.get(name, layer[name]), bits, group_size, symmetric,
                                          scale_dtype=layer[name].dtype)
        layer.update({k: v for k, v in scaled.items() if k.endswith("norm")})
        layers.append(layer)
    return {**params, "layers": layers}
