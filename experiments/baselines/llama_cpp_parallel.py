"""Baseline: llama.cpp decoding many sequences at once, as `llama-server -np N` does.

llama-server keeps N slots on one context; every iteration it builds one `llama_batch` holding the
next token of each slot that is generating plus chunks of the prompts of slots still reading theirs
(up to `n_batch` tokens), calls `llama_decode` once, samples each slot whose last token asked for
logits, and frees a slot (and its KV cells) when its request ends; a waiting request takes the
first free slot. This engine runs the same loop through llama-cpp-python's low-level API, on the
same F32 GGUF as the batch-1 run (`experiments/baselines/llama_cpp.py`), greedy, each request forced
to its workload output length. The context reserves `parallel` x (longest request) cells up front,
split per slot (llama-server's `-c` divided by `-np`), so its KV numbers are a reservation.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import numpy as np

import models
from experiments.baselines.llama_cpp import LlamaCppEngine
from experiments.trace import RequestRecord, RunTrace
from experiments.provenance import host_cores
from experiments.workloads import Request

N_BATCH = 512  # tokens per llama_decode call (llama-server's default physical batch)


def open_context(path, n_seq_max: int, cells_per_seq: int, n_batch: int, n_ubatch: int, n_threads: int):
    """(LlamaModel, LlamaContext) for the GGUF at `path`: `n_seq_max` sequences, each owning
    `cells_per_seq` KV cells (not unified, as llama-server -np N), the KV cache at llama.cpp's
    default type (F16)."""
    from llama_cpp import llama_cpp as C
    from llama_cpp._internals import LlamaContext, LlamaModel

    C.llama_backend_init()
    # llama-cpp-python routes llama.cpp's log through this logger; Llama(verbose=False) sets the same level
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    llama_model = LlamaModel(path_model=str(path), params=C.llama_model_default_params(), verbose=False)
    params = C.llama_context_default_params()
    params.n_ctx, params.n_seq_max = n_seq_max * cells_per_seq, n_seq_max
    params.n_batch, params.n_ubatch = n_batch, n_ubatch
    params.n_threads = params.n_threads_batch = n_threads
    params.kv_unified = False  # each sequence owns n_ctx / n_seq_max cells
    return llama_model, LlamaContext(model=llama_model, params=params, verbose=False)


@dataclasses.dataclass
class _Slot:
    request: Request
    unread: list[int]  # prompt tokens not yet decoded
    position: int = 0  # next token's position
    tokens: list[int] = dataclasses.field(default_factory=list)
    first_token_s: float = 0.0


class LlamaCppParallelEngine(LlamaCppEngine):
    """llama.cpp F32 with `parallel` slots decoded together (continuous batching), greedy."""

    def __init__(self, model: models.Model, run_config, requests: list[Request]):
        path = self._write_f32_gguf(model, requests)  # no batch-1 `Llama`: one context, the slots'
        from llama_cpp import llama_cpp as C

        self.C, self.parallel = C, run_config.parallel
        per_slot = max(len(r.prompt) + r.output_len for r in requests) + 1
        self.llama_model, self.context = open_context(path, self.parallel, per_slot, N_BATCH, N_BATCH,
                                                      run_config.n_threads or host_cores())
        self.batch = C.llama_batch_init(N_BATCH, 0, 1)
        self.n_vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(self.llama_model.model))
        self.kv_reserved_tokens = self.parallel * per_slot

    def __del__(self):
        if getattr(self, "batch", None) is not None:
            self.C.llama_batch_free(self.batch)

    def serve(self, requests: list[Request], progress) -> RunTrace:
        C, ctx = self.C, self.context.ctx
        memory = C.llama_get_memory(ctx)
        pending = collections.deque(sorted(requests, key=lambda r: r.arrival_s))
        slots: list[_Slot | None] = [None] * self.parallel
        records, used_peak, num_steps, seqs_sum, util_sum = [], 0, 0, 0, 0.0
        decode_s, decode_tokens, prefill_s = 0.0, 0, 0.0
        start = time.perf_counter()
        while pending or any(slots):
            now = time.perf_counter() - start
            if not any(slots) and pending[0].arrival_s > now:
                time.sleep(pending[0].arrival_s - now)
                now = time.perf_counter() - start
            for i in range(self.parallel):  # a waiting request takes the first free slot
                if slots[i] is None and pending and pending[0].arrival_s <= now:
                    r = pending.popleft()
                    slots[i] = _Slot(r, list(r.prompt))
            rows = self._fill_batch(slots)
            step_start = time.perf_counter() - start
            if C.llama_decode(ctx, self.batch) != 0:
                raise RuntimeError(f"llama_decode failed on a batch of {self.batch.n_tokens} tokens")
            t = time.perf_counter() - start
            if self.batch.n_tokens == len(rows):  # one token per slot: a pure decode step
                decode_s, decode_tokens = decode_s + t - step_start, decode_tokens + len(rows)
            else:
                prefill_s += t - step_start
            num_steps, seqs_sum = num_steps + 1, seqs_sum + sum(s is not None for s in slots)
            used = sum(s.position for s in slots if s is not None)  # KV cells holding a real token
            used_peak, util_sum = max(used_peak, used), util_sum + used / self.kv_reserved_tokens
            for i, row in rows:  # slots whose last batched token asked for logits: sample greedily
                slot = slots[i]
                logits = np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, row), shape=(self.n_vocab,))
                slot.tokens.append(int(np.argmax(logits)))
                if len(slot.tokens) == 1:
                    slot.first_token_s = t
                if len(slot.tokens) == slot.request.output_len:
                    r = slot.request
                    self.outputs[r.request_id] = slot.tokens
                    records.append(RequestRecord(r.request_id, len(r.prompt), r.output_len, r.arrival_s,
                                                 slot.first_token_s, t))
                    C.llama_memory_seq_rm(memory, i, -1, -1)  # free the slot's KV cells
                    slots[i] = None
                    progress(1)
        wall = time.perf_counter() - start
        per_token = self.per_token_bytes
        return RunTrace(records, wall, self.kv_reserved_tokens * per_token, used_peak * per_token,
                        util_sum / max(1, num_steps), sum(r.output_len for r in requests), prefill_s,
                        extra_metrics={"decode_tokens_per_s": decode_tokens / max(decode_s, 1e-9),
                                       "mean_seqs_per_step": seqs_sum / max(1, num_steps)})

    def _fill_batch(self, slots: list[_Slot | None]) -> list[tuple[int, int]]:
        """Put each generating slot's last token, then prompt chunks, into the batch (llama-server's
        order); returns (slot, batch row) for every row whose logits are needed."""
        batch, rows, n = self.batch, [], 0

        def add(slot_index: int, slot: _Slot, token: int, wants_logits: bool) -> None:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, slot.position, 1
            batch.seq_id[n][0], batch.logits[n] = slot_index, wants_logits
            if wants_logits:
                rows.append((slot_index, n))
            slot.position, n = slot.position + 1, n + 1

        for i, slot in enumerate(slots):
            if slot is not None and not slot.unread:
                add(i, slot, slot.tokens[-1], True)
        for i, slot in enumerate(slots):
            while slot is not None and slot.unread and n < N_BATCH:
                token = slot.unread.pop(0)
                add(i, slot, token, not slot.unread)
        batch.n_tokens = n
        return rows
