"""The paper-scale projection (`engine: parallel_projection`): one published model on one GPU type,
laid out by `distributed/projection.py`'s memory and communication model (the smallest tp, then
pp, whose fullest device holds the fp16 weights plus `kv_tokens` of KV cache in 90% of its memory),
with what that layout implies per token, beside published deployment advice. Arithmetic on
published shapes and datasheet numbers: nothing here is measured, and the table says so.
"""

from __future__ import annotations

import time

import models
from distributed.projection import GPUS, LLAMA2, projection_row
from experiments.trace import RunTrace


class ParallelProjectionEngine:
    times_itself = True  # nothing is timed

    def __init__(self, model: models.Model, run_config, requests):
        del model, requests  # the shapes are the published model's, not the experiment's
        self.run_config = run_config

    def warmup(self) -> None:
        pass

    def serve(self, requests, progress) -> RunTrace:
        rc, start = self.run_config, time.perf_counter()
        row = projection_row(LLAMA2[rc.model_shape], GPUS[rc.gpu], rc.kv_tokens, rc.bytes_per_param)
        extra = {key: value for key, value in row.items() if key not in ("model", "gpu")}
        progress(len(requests))
        return RunTrace([], time.perf_counter() - start, 0, 0, 1.0, 0, simulated=True, extra_metrics=extra)
