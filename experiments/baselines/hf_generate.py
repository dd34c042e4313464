"""Baseline: HF transformers `generate` (PyTorch, CPU, eager attention) in static batches.

It holds exactly our model's weights (converted with `models.loading.to_transformers`), runs the
same requests in the same static-batch policy, greedy, with every request forced to its workload
output length (`min_new_tokens = max_new_tokens`; rows shorter than the batch's longest keep
generating, as HF does). Prompts are left-padded with an attention mask, as HF expects.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

import models
from models.loading import to_transformers
from experiments.engines import BatchOutcome, kv_bytes_per_token, serve_static_batches
from experiments.workloads import Request


class _FirstTokenTimer(BaseStreamer):
    """Records when `generate` emits its first new tokens (the second `put`; the first is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.first_token_time = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


class HFGenerateEngine:
    def __init__(self, model: models.Model, run_config):
        self.batch_size = run_config.batch_size
        self.hf_model = to_transformers(model.params, model.config)
        self.pad_id = model.config.eos_token_ids[0] if model.config.eos_token_ids else 0
        self.per_token_bytes = kv_bytes_per_token(model)  # HF runs in f32 like our default

    def _generate(self, batch: list[Request]) -> BatchOutcome:
        width = max(len(r.prompt) for r in batch)
        max_new = max(r.output_len for r in batch)
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt)) + list(r.prompt) for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch])
        timer = _FirstTokenTimer()
        with torch.inference_mode():
            out = self.hf_model.generate(ids, attention_mask=mask, max_new_tokens=max_new,
                                         min_new_tokens=max_new, do_sample=False,
                                         pad_token_id=self.pad_id, streamer=timer)
        end = time.perf_counter()
        generated = out.shape[0] * (out.shape[1] - width)
        # HF's DynamicCache holds [batch, width + s] per layer after step s (grown by concatenation);
        # row r holds real tokens for its prompt and its first min(s, output_len) outputs.
        steps = np.arange(1, max_new + 1)
        allocated = len(batch) * (width + steps)
        used = sum(len(r.prompt) + np.minimum(steps, r.output_len) for r in batch)
        return BatchOutcome(timer.first_token_time or end, end, int(allocated[-1]) * self.per_token_bytes,
                            int(used[-1]) * self.per_token_bytes, float(np.mean(used / allocated)), generated)

    def warmup(self) -> None:
        self._generate([Request(0, (self.pad_id + 1,) * 4, 2, 0.0)])

    def serve(self, requests, progress):
        return serve_static_batches(requests, self.batch_size, self._generate, progress)
