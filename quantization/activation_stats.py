"""What calibration saw at one projection's input: the statistics the calibrated schemes read.

    stats = ActivationStats.of(x)          # x [tokens, in] -> absmax, mean |x|, optionally x^T x
    stats = stats.merged(ActivationStats.of(more))

    absmax    SmoothQuant's smoothing factors and static per-tensor activation scales (`w8a8.py`)
    mean_abs  AWQ's activation salience (`awq.py`)
    hessian   sum of x x^T over the tokens: GPTQ's H (`gptq.py`), and the exact output error of a
              weight change dW, ||x dW||^2 summed over tokens = tr(dW^T H dW), which AWQ's scale
              search minimizes

Plain numpy (calibration runs eagerly, see experiments/quant_calibration.py); the Hessian is kept
in float64, summed over thousands of tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ActivationStats:
    absmax: np.ndarray  # f32[in]
    mean_abs: np.ndarray  # f32[in]
    tokens: int
    hessian: np.ndarray | None = None  # f64[in, in], sum of x x^T (None: not recorded)

    @classmethod
    def of(cls, x, hessian: bool = False) -> "ActivationStats":
        """The statistics of activations x [..., in] (every leading index a token)."""
        x = np.asarray(x, np.float32)
        x = x.reshape(-1, x.shape[-1])  # f32[tokens, in]
        x64 = x.astype(np.float64)
        return cls(np.abs(x).max(axis=0), np.abs(x).mean(axis=0), len(x), x64.T @ x64 if hessian else None)

    def merged(self, other: "ActivationStats") -> "ActivationStats":
        """The statistics over both sets of tokens."""
        total = self.tokens + other.tokens
        mean_abs = (self.mean_abs * self.tokens + other.mean_abs * other.tokens) / total
        hessian = None if self.hessian is None or other.hessian is None else self.hessian + other.hessian
        return ActivationStats(np.maximum(self.absmax, other.absmax), mean_abs.astype(np.float32), total, hessian)

    def output_error(self, delta: np.ndarray) -> float:
        """sum over the calibration tokens of ||x @ delta||^2 for a weight change delta [in, out]."""
        if self.hessian is None:
            raise ValueError("output_error needs the Hessian: calibrate with hessian=True")
        delta = np.asarray(delta, np.float64)
        return float(np.sum(delta * (self.hessian @ delta)))
