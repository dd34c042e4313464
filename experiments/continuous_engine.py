"""The continuous-batching engine in the harness: requests join `continuous_batching.Engine` as they
arrive (real-time Poisson replay), one engine step at a time, under the run's scheduling policy.

Timing follows the other engines: the warm-up either replays the whole workload at once, untimed
(`warmup`), or dry-runs the scheduler over it and runs the model once per new step shape
(`precompile`); then the timed replay records each request's first-token and finish times on the
wall clock; compiles are counted by the harness (`experiments.compile_watch`).

Poisson arrivals mix prompts and decodes into step shapes an all-at-once replay never meets. So the
warm-up also compiles, per kind of step, the envelope of every shape it met
(`continuous_batching.step_shapes`), and then freezes the shape set: in the timed replay a step
whose own shape was not compiled runs on the cheapest compiled shape that covers it (padding), as a
server with a precompiled bucket grid does, and the run reports how many steps did
(`padded_steps`).

With `kv_cache_dtype: int8` (or `fp8_e4m3` with `calculate_kv_scales: true`) the run first folds
per-head K / V scales into the model's weights (`quantization/kv_int8.py`): absmax / 127 (FP8:
/ 448) over `quant_calibration.KV_CALIBRATION_WINDOWS` windows of 256 ShareGPT prompt tokens
(`experiments/quant_calibration.py`), part of the engine's build, so of its startup.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
from tqdm import tqdm

import models
from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.sampling_params import SamplingParams
from continuous_batching.step_shapes import ShapeSet
from experiments.config_checks import engine_settings
from experiments.quant_calibration import with_calibrated_kv_scales
from experiments.trace import RequestRecord, RunTrace, untimed_pass
from experiments.workloads import Request
from paged_attention.buckets import round_up


def engine_config(run_config, requests: list[Request]) -> EngineConfig:
    """The run's `EngineConfig`: its keys as given (experiments/config.py `ContinuousRunConfig`), an
    unset `max_model_len` as the workload's longest request in whole blocks, and a token budget of
    at least the longest prompt when prompts are not chunked (a whole prompt is one step's work)."""
    longest = max(len(r.prompt) + r.output_len for r in requests)
    config = engine_settings(run_config, max_model_len=round_up(longest, run_config.block_size))
    if not config.chunks_prompts:
        longest_prompt = max(len(r.prompt) for r in requests)
        config = dataclasses.replace(config, max_num_batched_tokens=max(config.max_num_batched_tokens, longest_prompt))
    return config


class ContinuousServeEngine:
    def __init__(self, model: models.Model, run_config, requests: list[Request]):
        self.config = engine_config(run_config, requests)
        if self.config.kv_cache_dtype == "int8" or self.config.calculate_kv_scales:  # calibrated K / V scales
            model = with_calibrated_kv_scales(model, self.config.kv_cache_dtype)
        self.model, self.requests = model, requests
        self.outputs: dict[int, list[int]] = {}  # request id -> generated tokens (for checks)
        self.shapes = ShapeSet()  # step shapes compiled for this run, shared by every Engine it builds

    def warmup(self) -> None:
        """Replay the workload at once, untimed; compile the envelope of its step shapes; freeze."""
        untimed_pass(self, self.requests, self.config.name)
        self._compile_envelope_and_freeze(self._engine().runner)

    def precompile(self) -> None:
        """Compile every step shape the workload reaches without serving it: a dry run of the
        engine on all requests at once, whose runner runs a step only when its shape is new (vLLM's
        and JetStream's start-up compile their bucket grid; this grid is the one the scheduler
        will visit). When requests arrive over time, also the envelope (an offline run meets
        exactly the dry run's shapes). Then freeze."""
        engine = self._engine(dry_run=True)
        for r in self.requests:
            engine.add_request(list(r.prompt), _sampling_params(r))
        with tqdm(desc=f"precompile {self.config.name}", unit="step", file=sys.stderr, leave=False) as bar:
            while engine.has_unfinished():
                engine.step()
                bar.update()
        if all(r.arrival_s == 0 for r in self.requests):
            self.shapes.frozen = True
        else:
            self._compile_envelope_and_freeze(engine.runner)

    def _compile_envelope_and_freeze(self, runner) -> None:
        for shape, flags in self.shapes.envelope():
            if (shape, flags) not in self.shapes.compiled:
                runner.compile_shape(shape, flags)
        self.shapes.frozen = True

    def _engine(self, dry_run: bool = False) -> Engine:
        return Engine(self.model, self.config, shapes=self.shapes, dry_run=dry_run)

    def serve(self, requests: list[Request], progress) -> RunTrace:
        engine = self._engine()
        padded_before = self.shapes.padded_steps
        cache_itemsize = engine.runner.kv_cache[0][0].dtype.itemsize  # kv_cache_dtype: fp8 stores 1 byte
        per_token, block_size = self.model.config.kv_bytes_per_token(cache_itemsize), self.config.block_size
        pending = sorted(requests, key=lambda r: r.arrival_s)
        by_engine_id: dict[int, Request] = {}
        first_token: dict[int, float] = {}
        last_token: dict[int, float] = {}
        gaps: list[float] = []  # time between a request's consecutive tokens (inter-token latency)
        records: list[RequestRecord] = []
        used_peak = blocks_peak = num_steps = 0
        util_sum = prefill_s = decode_s = 0.0
        decode_tokens = 0  # tokens sampled by steps that computed no prompt (pure decode steps)
        start = time.perf_counter()
        while pending or engine.has_unfinished():
            if not engine.has_unfinished():
                time.sleep(max(0.0, pending[0].arrival_s - (time.perf_counter() - start)))
            now = time.perf_counter() - start
            while pending and pending[0].arrival_s <= now:
                r = pending.pop(0)
                by_engine_id[engine.add_request(list(r.prompt), _sampling_params(r))] = r
            step_start = time.perf_counter() - start
            outputs = engine.step()
            t = time.perf_counter() - start
            step_s = t - step_start
            if engine.stats.last_step_prefilled:
                prefill_s += step_s
            else:
                decode_s += step_s
                decode_tokens += len(engine.stats.last_plan.seqs)
            tokens_used, blocks_used = engine.kv_usage()
            used_peak = max(used_peak, tokens_used)
            blocks_peak = max(blocks_peak, blocks_used)
            util_sum += tokens_used / max(1, blocks_used * block_size)
            num_steps += 1
            for out in outputs:
                r = by_engine_id[out.request_id]
                first_token.setdefault(r.request_id, t)
                if r.request_id in last_token:
                    gaps.append(t - last_token[r.request_id])
                last_token[r.request_id] = t
                if out.finished:
                    self.outputs[r.request_id] = out.outputs[0].token_ids
                    records.append(RequestRecord(r.request_id, len(r.prompt), r.output_len, r.arrival_s,
                                                 first_token[r.request_id], t))
                    progress(1)
        wall = time.perf_counter() - start
        generated = sum(r.output_len for r in requests)
        hit_rate, cached_fraction = engine.prefix_cache_usage()
        return RunTrace(records, wall, blocks_peak * block_size * per_token, used_peak * per_token,
                        util_sum / max(1, num_steps), generated, prefill_s,
                        extra_metrics={"num_steps": num_steps, "num_preemptions": engine.num_preemptions,
                                       "padded_steps": self.shapes.padded_steps - padded_before,
                                       "mean_seqs_per_step": engine.stats.scheduled_seqs / max(1, num_steps),
                                       "prefill_steps": engine.stats.prefill_steps,
                                       "decode_tokens_per_s": decode_tokens / decode_s if decode_s else 0.0,
                                       "inter_token_latency_p50_s": float(np.percentile(gaps, 50)) if gaps else 0.0,
                                       "inter_token_latency_p95_s": float(np.percentile(gaps, 95)) if gaps else 0.0,
                                       "prefix_cache_hit_rate": hit_rate,
                                       "cached_prompt_token_fraction": cached_fraction})


def _sampling_params(r: Request) -> SamplingParams:
    """Greedy, exactly the request's output length (EOS is an ordinary token)."""
    return SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
