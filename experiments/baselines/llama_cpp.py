"""Baseline: llama.cpp (through llama-cpp-python) at batch 1 on the same weights, as an F32 GGUF.

Our `smollm2-135m` preset is the packaged Q4_1 GGUF dequantized to f32. `f32_gguf` writes exactly
those weights back as an all-F32 GGUF (`quantization/gguf_export.py`: gguf's own reader,
dequantizer and writer; every metadata field, tokenizer included, copied unchanged), so llama.cpp and our engine multiply the same numbers.
The engine serves requests one at a time (llama.cpp's single-sequence path, what the issue compares
our batch-1 decode with), greedy, each forced to its workload output length (EOS is not checked), the
cache cleared between requests so no prompt prefix is reused. `decode_tokens_per_s` counts tokens
after the first (which waits for the prompt pass) over the time after the first.

llama-cpp-python is an optional extra (`pip install -e .[llama-cpp]`): it builds llama.cpp from
source, ~4 minutes on 2 cores.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import models
from experiments.provenance import host_cores
from experiments.trace import OptionalEngineMissing, RequestRecord, RunTrace, kv_bytes_per_token, untimed_pass
from experiments.workloads import Request
from quantization.gguf_export import write_gguf


def require_llama_cpp(engine: str, model: models.Model) -> None:
    """Fail before any work when llama-cpp-python is missing (a skip for the harness) or the model
    has no GGUF file to hand llama.cpp."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise OptionalEngineMissing(f"engine {engine!r} needs llama-cpp-python: pip install -e .[llama-cpp] "
                                    "(builds llama.cpp from source, ~4 minutes)") from None
    if model.gguf_path is None:
        raise ValueError(f"engine {engine!r} needs a model loaded from a GGUF file "
                         "(e.g. model: smollm2-135m), not random or HF-checkpoint weights")


def f32_gguf(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write `source`'s tensors dequantized to F32 (and its metadata unchanged) to `dest`."""
    return write_gguf(source, dest)[0]


class LlamaCppEngine:
    """llama.cpp F32 on the model's own GGUF weights, one request at a time, greedy."""

    informational_outputs = True  # another framework: its tokens are compared, never required equal

    def __init__(self, model: models.Model, run_config, requests: list[Request]):
        path = self._write_f32_gguf(model, requests)
        import llama_cpp

        n_ctx = max(len(r.prompt) + r.output_len for r in requests) + 1
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), verbose=False,
                                   n_threads=run_config.n_threads or host_cores(),
                                   n_threads_batch=run_config.n_threads or host_cores())

    def _write_f32_gguf(self, model: models.Model, requests: list[Request]) -> Path:
        """Check that llama.cpp can run `model`, keep the run's requests, and write the model's GGUF
        dequantized to F32 into a temporary folder that lives as long as the engine."""
        require_llama_cpp("llama-cpp", model)
        self.per_token_bytes = kv_bytes_per_token(model)
        self.requests = requests
        self.outputs: dict[int, list[int]] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="infer-lab-llama-cpp-")
        return f32_gguf(model.gguf_path, Path(self._dir.name) / "model.F32.gguf")

    def _generate(self, prompt: list[int], output_len: int) -> tuple[list[int], float, float]:
        """Greedy tokens, and when the first and the last arrived (perf_counter)."""
        self.llm.reset()  # no prefix reuse between requests
        tokens, first = [], 0.0
        for token in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            tokens.append(int(token))
            if len(tokens) == 1:
                first = time.perf_counter()
            if len(tokens) == output_len:
                break
        return tokens, first, time.perf_counter()

    def warmup(self) -> None:
        untimed_pass(self, self.requests, "llama.cpp")

    def precompile(self) -> None:
        """Nothing to compile: llama.cpp's kernels are built ahead of time; the model loaded at build."""

    def serve(self, requests: list[Request], progress) -> RunTrace:
        records, decode_s, decode_tokens, prefill_s = [], 0.0, 0, 0.0
        start = time.perf_counter()
        for r in sorted(requests, key=lambda r: r.arrival_s):
            wait = r.arrival_s - (time.perf_counter() - start)
            if wait > 0:
                time.sleep(wait)
            begin = time.perf_counter()
            tokens, first, end = self._generate(list(r.prompt), r.output_len)
            self.outputs[r.request_id] = tokens
            prefill_s += first - begin
            decode_s, decode_tokens = decode_s + end - first, decode_tokens + len(tokens) - 1
            records.append(RequestRecord(r.request_id, len(r.prompt), r.output_len, r.arrival_s,
                                         first - start, end - start))
            progress(1)
        wall = time.perf_counter() - start
        peak = max(len(r.prompt) + r.output_len for r in requests) * self.per_token_bytes
        return RunTrace(records, wall, peak, peak, 1.0, sum(r.output_len for r in requests), prefill_s,
                        extra_metrics={"decode_tokens_per_s": decode_tokens / max(decode_s, 1e-9),
                                       "mean_seqs_per_step": 1.0})
