"""GPTQ (Frantar et al., 2022; IST-DASLab's `gptq.py`, AutoGPTQ): quantize a weight one input row at
a time and push each row's rounding error onto the rows not yet quantized, weighted by the inverse
Hessian of the layer's output error, so the errors cancel in `x @ W` instead of adding up.

    weight = gptq_quantize(w, hessian, bits=4, group_size=128)     # w [in, out], hessian f[in, in]

Minimizes sum over calibration tokens of ||x W - x Q||^2 = tr((W - Q)^T H (W - Q)) with H = sum x^T x
(`ActivationStats.hessian`). The algorithm, as in the reference implementation:

    dead inputs (H_ii = 0) are zeroed; H += 1% of its mean diagonal (dampening)
    U = upper Cholesky factor of H^-1
    for each block of 128 rows, for each row i in it:
        at a group's first row: its scales (and zeros) from the current, error-updated weights
        q_i = quantize(w_i);  e_i = (w_i - q_i) / U_ii;  w_j -= U_ij e_i for the block's rows j > i
    after each block, the later rows take the block's errors at once (lazy batch update)

`act_order` (AutoGPTQ's `desc_act`) visits rows by decreasing H_ii, the most active inputs first,
while their errors can still be compensated; groups then keep their contiguous rows and scales fixed
from the original weights before the pass (AutoGPTQ's `static_groups`), so the result is the same
`QuantizedTensor` layout the kernels read. Our weights are [in, out], so GPTQ's "columns" are our
rows. Codes and scales follow `weight_only.py`'s conventions. numpy, float64: a host-side pass.
"""

from __future__ import annotations

import numpy as np

from quantization.quantized_tensor import QuantizedTensor
from quantization.weight_only import group_scales_zeros, round_to_codes, tensor_from_codes

PERCDAMP = 0.01
BLOCK_SIZE = 128


def _inverse_hessian_factor(hessian: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor of the dampened H's inverse (a dead input's H_ii set to 1)."""
    h = np.array(hessian, np.float64)
    diagonal = np.diag_indices_from(h)
    h[diagonal] = np.where(np.diag(h) == 0, 1.0, np.diag(h))
    h[diagonal] += PERCDAMP * np.mean(np.diag(h))
    inverse = np.linalg.inv(np.linalg.cholesky(h))  # L^-1, so H^-1 = L^-T L^-1
    return np.linalg.cholesky(inverse.T @ inverse).T


def gptq_quantize(weight, hessian, bits: int, group_size: int = 0, symmetric: bool = True,
                  act_order: bool = False) -> QuantizedTensor:
    """weight [in, out] -> QuantizedTensor (`bits` 4 or 8, one scale per `group_size` input rows,
    0: per output channel) minimizing the output error under `hessian` f[in, in] = sum x^T x."""
    if hessian is None:
        raise ValueError("gptq needs the calibration Hessian: ActivationStats recorded with hessian=True")
    w = np.array(weight, np.float64)
    h = np.asarray(hessian, np.float64)
    rows, cols = w.shape
    if h.shape != (rows, rows):
        raise ValueError(f"hessian must be [{rows}, {rows}] for a weight of shape {w.shape}, got {h.shape}")
    group = group_size or rows
    w[np.diag(h) == 0] = 0.0  # inputs calibration never saw: nothing to preserve
    scales = np.zeros((-(-rows // group), cols))
    zeros = None if symmetric else np.zeros_like(scales)

    def set_group(g: int, rows_of_group: np.ndarray) -> None:
        scales[g], zero = group_scales_zeros(rows_of_group, bits, symmetric, xp=np)
        if zeros is not None:
            zeros[g] = zero

    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(rows)
    if act_order:  # static groups: every group's parameters from the original weights
        for g in range(len(scales)):
            set_group(g, w[g * group:(g + 1) * group])
    w = w[order]
    factor = _inverse_hessian_factor(h[np.ix_(order, order)])
    codes = np.zeros((rows, cols), np.int32)
    for start in range(0, rows, BLOCK_SIZE):
        end = min(start + BLOCK_SIZE, rows)
        errors = np.zeros((end - start, cols))
        for i in range(start, end):
            g = order[i] // group
            if not act_order and i % group == 0:
                set_group(g, w[i:i + group])
            zero = None if zeros is None else zeros[g]
            codes[i] = round_to_codes(w[i], scales[g], zero, bits, xp=np)
            dequantized = (codes[i] - (0 if zero is None else zero)) * scales[g]
            error = (w[i] - dequantized) / factor[i, i]
            w[i + 1:end] -= np.outer(factor[i, i + 1:end], error)
            errors[i - start] = error
        w[end:] -= factor[start:end, end:].T @ errors
    codes[order] = codes.copy()
    return tensor_from_codes(codes, scales, zeros, bits, group_size, np.asarray(weight).dtype)
