"""Baseline: llama.cpp's rows of the quantization table (`engine: llama-cpp-quant`).

One run writes the model's GGUF with its layers' linear weights in one llama.cpp block format
(`quantization/gguf_export.py`: the blocks our `quantize_blocks` makes, bit-exact with
llama-quantize; norms F32, the embedding F32 or Q8_0 in the 4-bit formats, the split our
`quant_eval` block-format rows use), or all
F32 for `quantization: none`, and measures it in llama.cpp (llama-cpp-python's low-level API) the
way `quant_eval` measures our model:

- size: bits per weight over the linear weights and the bytes of every tensor, read from the file;
- accuracy: perplexity on the same lee_background.cor windows and held-out ShareGPT prompt windows,
  each window decoded from an empty cache with logits for every token (every token but the first
  scored, our rule, which is llama.cpp's `perplexity` with --ctx-size window); logit error and top-1
  agreement of the first window against our unquantized model;
- speed: one llama_decode of one token per sequence at batch 1 and 64 (each sequence holding
  `context_len - 1` tokens of its own, non-unified KV cells as llama-server -np 64 keeps them), and
  one llama_decode of a `prompt_len`-token prompt; medians of `iterations` calls after two warm-up
  calls, the cache trimmed back between calls (untimed).

llama.cpp runs at its own defaults: F16 KV cache, its CPU kernels (a quantized matmul rounds the
activations to 8-bit blocks and multiplies integers), every core.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

import models
from experiments.baselines.llama_cpp import require_llama_cpp
from experiments.baselines.llama_cpp_parallel import open_context
from experiments.config import QuantEvalRunConfig
from experiments.perplexity import nll_of_next_tokens, perplexity_of, scoring_windows
from experiments.provenance import host_cores
from experiments.quant_calibration import CALIBRATION_WINDOW, held_out_prompt_ids
from experiments.quant_eval import DECODE_BATCHES, logit_errors, text_token_ids, window_logits_fn
from experiments.trace import RunTrace
from quantization.gguf_export import LINEAR_WEIGHT, write_gguf

# quant_eval's held-out prompt text starts after its calibration windows (at their default count)
HELD_OUT_AFTER_WINDOWS = QuantEvalRunConfig.model_fields["calibration_windows"].default


def gguf_sizes(path: str | Path) -> tuple[float, int, dict[str, int]]:
    """(bits per weight over the linear weights, bytes of every tensor, linear weights per type)."""
    tensors = gguf.GGUFReader(path).tensors
    linear = [t for t in tensors if LINEAR_WEIGHT.fullmatch(t.name)]
    types: dict[str, int] = {}
    for t in linear:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    bits = 8 * sum(int(t.n_bytes) for t in linear) / sum(int(t.n_elements) for t in linear)
    return bits, sum(int(t.n_bytes) for t in tensors), types


class LlamaCppQuantEngine:
    """llama.cpp on one block format of the model's weights: size, accuracy and speed."""

    times_itself = True  # warms up and times each measurement inside serve

    def __init__(self, model: models.Model, run_config, requests):
        del requests  # the text and the shapes come from the run config
        require_llama_cpp("llama-cpp-quant", model)
        from llama_cpp import llama_cpp as C

        self.C, self.base, self.run_config = C, model, run_config
        block_format = None if run_config.quantization == "none" else run_config.quantization
        self._dir = tempfile.TemporaryDirectory(prefix="infer-lab-llama-cpp-quant-")
        path, _ = write_gguf(model.gguf_path, Path(self._dir.name) / f"model.{block_format or 'F32'}.gguf",
                             block_format)
        self.bits_per_weight, self.model_bytes, self.types = gguf_sizes(path)
        rc = run_config
        cells = max(rc.window, rc.context_len, rc.prompt_len)
        self.n_batch = max(512, rc.window, rc.prompt_len, max(DECODE_BATCHES))
        self.llama_model, self.context = open_context(path, max(DECODE_BATCHES), cells, self.n_batch, 512,
                                                      rc.n_threads or host_cores())
        self.batch = C.llama_batch_init(self.n_batch, 0, 1)
        self.n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(self.llama_model.model))
        self.memory = C.llama_get_memory(self.context.ctx)

    def __del__(self):
        if getattr(self, "batch", None) is not None:
            self.C.llama_batch_free(self.batch)

    def warmup(self) -> None:
        pass  # each measurement warms itself up

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> np.ndarray | None:
        """One llama_decode of (sequence, position, token, wants logits) rows; f32[rows wanting
        logits, vocab] (a copy) when any does."""
        batch = self.batch
        for n, (seq, pos, token, wants_logits) in enumerate(rows):
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
            batch.seq_id[n][0], batch.logits[n] = seq, wants_logits
        batch.n_tokens = len(rows)
        if self.C.llama_decode(self.context.ctx, batch) != 0:
            raise RuntimeError(f"llama_decode failed on a batch of {len(rows)} tokens")
        outputs = sum(r[3] for r in rows)
        if not outputs:
            return None
        return np.ctypeslib.as_array(self.C.llama_get_logits(self.context.ctx), shape=(outputs, self.n_vocab)).copy()

    def _window_logits(self, window: np.ndarray) -> np.ndarray:
        """f32[window, vocab]: llama.cpp's logits over one window read into an empty cache."""
        self.C.llama_memory_clear(self.memory, True)
        return self._decode([(0, pos, int(token), True) for pos, token in enumerate(window)])

    def _perplexity(self, token_ids: list[int]) -> tuple[float, int, np.ndarray]:
        """(perplexity, tokens scored, the first window's logits) over quant_eval's windows."""
        rc = self.run_config
        windows = scoring_windows(token_ids, rc.window, rc.perplexity_windows)
        total, first = 0.0, None
        for window in windows:
            logits = self._window_logits(window)
            first = logits if first is None else first
            total += nll_of_next_tokens(logits, window)
        return (*perplexity_of(total, windows), first)

    def _median_seconds(self, rows: list[tuple[int, int, int, bool]], trim_from: int) -> float:
        """Median seconds of llama_decode(rows) over `iterations` calls after two warm-up calls; each
        call's sequences are trimmed back to `trim_from` tokens afterwards, untimed."""
        times = []
        for i in range(self.run_config.iterations + 2):
            start = time.perf_counter()
            self._decode(rows)
            if i >= 2:
                times.append(time.perf_counter() - start)
            for seq in {r[0] for r in rows}:
                self.C.llama_memory_seq_rm(self.memory, seq, trim_from, -1)
        return float(np.median(times))

    def _decode_tokens_per_s(self, batch: int, text: np.ndarray) -> float:
        """Tokens/s of one decode step of `batch` sequences, each holding context_len - 1 tokens."""
        held = self.run_config.context_len - 1
        self.C.llama_memory_clear(self.memory, True)
        fill = [(seq, pos, int(text[(seq + pos) % len(text)]), False) for seq in range(batch) for pos in range(held)]
        for start in range(0, len(fill), self.n_batch):
            self._decode(fill[start:start + self.n_batch])
        step = [(seq, held, 5, True) for seq in range(batch)]
        return batch / self._median_seconds(step, held)

    def serve(self, requests, progress) -> RunTrace:
        rc = self.run_config
        start = time.perf_counter()
        ids = np.asarray(text_token_ids(self.base), np.int32)
        ppl, scored, first_logits = self._perplexity(ids.tolist())
        chat = held_out_prompt_ids(self.base, HELD_OUT_AFTER_WINDOWS * CALIBRATION_WINDOW,
                                   rc.window * rc.perplexity_windows)
        chat_ppl, _, _ = self._perplexity(chat)
        base_logits = window_logits_fn(self.base.config, ids[:rc.window])(self.base.params)
        extra = {"bits_per_weight": self.bits_per_weight, "model_bytes": self.model_bytes, "perplexity": ppl,
                 "perplexity_tokens": scored, "prompt_perplexity": chat_ppl,
                 **logit_errors(base_logits, first_logits)}
        for batch in DECODE_BATCHES:
            extra[f"decode_b{batch}_tokens_per_s"] = self._decode_tokens_per_s(batch, ids)
        self.C.llama_memory_clear(self.memory, True)
        prompt = [(0, pos, int(ids[pos % len(ids)]), pos == rc.prompt_len - 1) for pos in range(rc.prompt_len)]
        extra["prompt_tokens_per_s"] = rc.prompt_len / self._median_seconds(prompt, 0)
        extra["block_formats_used"] = ", ".join(f"{name} x{count}" for name, count in sorted(self.types.items()))
        progress(len(requests))
        return RunTrace([], time.perf_counter() - start, 0, 0, 1.0, 0, simulated=True, extra_metrics=extra)
