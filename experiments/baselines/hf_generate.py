"""Baseline: HF transformers `generate` (PyTorch, CPU) in static batches, at its own defaults.

It holds exactly our model's weights (converted with `models.loading.to_transformers`), with
transformers' default attention (SDPA) and torch using every core XLA uses (`torch.set_num_threads`),
runs the same requests in the same static-batch policy, greedy, with every request run to its
workload output length: EOS is an ordinary token, as for our engines (`ignore_eos`), so HF neither
stops at it nor suppresses it (`min_new_tokens` would mask EOS and change the tokens); rows shorter
than the batch's longest keep generating, as HF does. Prompts are left-padded with an attention mask, as HF expects. Its warm-up is
every engine's: one untimed pass over the workload. Its greedy tokens are recorded; the harness
reports how many requests got the same tokens as our engines (informational: torch and XLA round
differently, so near-ties in f32 may pick different tokens).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

import models
from models.loading import to_transformers
from experiments.trace import BatchOutcome, kv_bytes_per_token, serve_static_batches, untimed_pass
from experiments.provenance import host_cores
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
    informational_outputs = True  # another framework: its tokens are compared, never required equal

    def __init__(self, model: models.Model, run_config, requests: list[Request]):
        self.batch_size, self.requests = run_config.batch_size, requests
        torch.set_num_threads(host_cores())
        self.hf_model = to_transformers(model.params, model.config)  # transformers' default attention
        self.hf_model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, EOS included
        self.outputs: dict[int, list[int]] = {}  # request id -> generated tokens (for the comparison)
        self.pad_id = model.config.eos_token_ids[0] if model.config.eos_token_ids else 0
        self.per_token_bytes = kv_bytes_per_token(model)  # HF runs in f32 like our default

    def _generate(self, batch: list[Request]) -> BatchOutcome:
        width = max(len(r.prompt) for r in batch)
        max_new = max(r.output_len for r in batch)
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt)) + list(r.prompt) for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch])
        timer = _FirstTokenTimer()
        with torch.inference_mode():
            out = self.hf_model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                         pad_token_id=self.pad_id, streamer=timer)
        end = time.perf_counter()
        for row, r in enumerate(batch):
            self.outputs[r.request_id] = out[row, width:width + r.output_len].tolist()
        generated = out.shape[0] * (out.shape[1] - width)
        # HF's DynamicCache holds [batch, width + s] per layer after step s (grown by concatenation);
        # row r holds real tokens for its prompt and its first min(s, output_len) outputs.
        steps = np.arange(1, max_new + 1)
        allocated = len(batch) * (width + steps)
        used = sum(len(r.prompt) + np.minimum(steps, r.output_len) for r in batch)
        return BatchOutcome(timer.first_token_time or end, end, int(allocated[-1]) * self.per_token_bytes,
                            int(used[-1]) * self.per_token_bytes, float(np.mean(used / allocated)), generated)

    def warmup(self) -> None:
        untimed_pass(self, self.requests, f"hf b{self.batch_size}")

    def precompile(self) -> None:
        """Nothing to compile: torch runs `generate` eagerly (HF's default; no torch.compile)."""

    def serve(self, requests, progress):
        trace = serve_static_batches(requests, self.batch_size, self._generate, progress)
        trace.extra_metrics["torch_threads"] = torch.get_num_threads()
        trace.extra_metrics["attn_implementation"] = self.hf_model.config._attn_implementation
        return trace
