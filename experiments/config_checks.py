"""Checks across the keys of a parsed experiment config: what pydantic's per-field types cannot say.

Every check returns `(YAML path, message)` pairs, the message naming the allowed values;
`experiments.config.parse_config` raises one `ConfigError` listing them all, before any model loads.

- claims: `run` / `ratio_to` name a run, and `metric` is a number those runs' engines report
  (`experiments/metric_names.py`)
- rate sweeps (`request_rates`): only engines that serve requests on a clock; keys a sweep does not
  read (`workload.request_rate`, `check_same_outputs`, `claims`) are refused, and
  `latency_bound_s_per_token` needs a sweep
- one experiment, one kind of results table and plot (experiments/tables.py `_table_kind`): serving
  and decode engines together, or only memory simulations, only sharing simulations, or only
  attention benchmarks
- a continuous run's engine settings, checked by `EngineConfig` itself (its error names the field)
- a key set in the YAML where the run ignores it (pydantic's `model_fields_set`: set, even to its
  default, as opposed to left out) is an error: e.g. `reservation` outside policy `request_level`
- sizes that can only fail later: a memory-sim budget below one request's reservation (the
  simulation would wait forever), a KV cache that cannot hold one request, a non-power-of-two `block_size` for the Pallas kernels
- `warmup: precompile` only with engines that have a `precompile()` (`PRECOMPILE_ENGINES`)
- `check_model_limits`: what needs the model's config (its context length), read before the weights

Request lengths come from the workload's caps: a request has at most `max_prompt_len +
shared_prefix_len` prompt tokens and `max_output_len` output tokens (exactly those for kind `fixed`).
A size check fails when some request the caps allow would not fit; with no caps it is skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from continuous_batching.engine_config import EngineConfig, EngineConfigError
from experiments.metric_names import SWEEP_ENGINES, claimable_metrics
from paged_attention.buckets import is_pow2, pow2_at_least, round_up
from quantization.scheme_names import CALIBRATED_SCHEMES

Problem = tuple[str, str]  # (YAML path, message)


# Engines whose runs can share one experiment: experiments/report.py picks one table and plot for all
# of an experiment's runs (`_table_kind`), which reads metrics only engines of one group report.
REPORT_GROUPS = (("static", "hf", "continuous", "llama-cpp", "gemm_roofline"),  # serving / decode
                 ("memory_sim",), ("sharing_sim",), ("attention_bench",), ("fusion_bench",),
                 ("quant_eval", "llama-cpp-quant"), ("parallel_eval",), ("parallel_projection",))


# Engines with a `precompile()` (classes of the experiments/engines.py registry), which `warmup: precompile` calls.
PRECOMPILE_ENGINES = ("static", "hf", "continuous", "llama-cpp", "gemm_roofline")


def check_config(config) -> list[Problem]:
    """Every cross-key problem of a parsed `ExperimentConfig`: top-level keys, claims, then each run."""
    problems = list(_top_level(config)) + list(_claims(config))
    for i, run in enumerate(config.runs):
        problems += [(f"runs[{i}].{key}", message) for key, message in _RUN_CHECKS[run.engine](run, config.workload)]
    return problems


def check_model_limits(config, model_config) -> list[Problem]:
    """Problems only the model's config reveals (`models.config.ModelConfig`, read without weights):
    sequences longer than its `max_position_embeddings`, more pipeline stages than layers."""
    limit, problems = model_config.max_position_embeddings, []
    longest = longest_request(config.workload)
    for i, run in enumerate(config.runs):
        if run.engine == "continuous":
            if run.max_model_len is not None and run.max_model_len > limit:
                problems.append((f"runs[{i}].max_model_len", f"{run.max_model_len} exceeds the model's "
                                 f"max_position_embeddings ({model_config.name}: {limit}); allowed: 1..{limit}"))
            elif run.max_model_len is None and longest is not None and round_up(longest, run.block_size) > limit:
                problems.append((f"runs[{i}].max_model_len", f"unset, so the workload's longest request: up to "
                                 f"{_describe_longest(config.workload)}, rounded up to block_size "
                                 f"{run.block_size} = {round_up(longest, run.block_size)} tokens, beyond the "
                                 f"model's max_position_embeddings ({model_config.name}: {limit}); lower the "
                                 f"workload caps to <= {limit // run.block_size * run.block_size} tokens in all"))
        if run.engine == "sharing_sim" and run.mode == "beam_search" and longest is not None and longest > limit:
            problems.append((f"runs[{i}].mode", f"beam_search runs the model on requests of up to "
                             f"{_describe_longest(config.workload)}, beyond its max_position_embeddings "
                             f"({model_config.name}: {limit}); lower the workload caps to <= {limit} in all"))
        if run.engine in ("continuous", "parallel_eval") and run.offload_layers > model_config.num_layers:
            problems.append((f"runs[{i}].offload_layers", f"{run.offload_layers} layers, but {model_config.name} has "
                             f"{model_config.num_layers}; allowed: 0..{model_config.num_layers}"))
        if run.engine in ("continuous", "parallel_eval") and run.pp > model_config.num_layers:
            problems.append((f"runs[{i}].pp", f"{run.pp} stages, but {model_config.name} has "
                             f"{model_config.num_layers} layers; allowed: 1..{model_config.num_layers}"))
        for key in ("context_len", "prompt_len"):
            if run.engine == "parallel_eval" and getattr(run, key) > limit:
                problems.append((f"runs[{i}].{key}", f"{getattr(run, key)} exceeds the model's max_position_embeddings "
                                 f"({model_config.name}: {limit}); allowed: 1..{limit}"))
    return problems


# ----- request lengths from the workload's caps -------------------------------------------------
def longest_request(workload) -> int | None:
    """Most prompt + output tokens a request of `workload` can have; None when a cap is missing."""
    if workload.max_prompt_len is None or workload.max_output_len is None:
        return None
    return workload.max_prompt_len + workload.shared_prefix_len + workload.max_output_len


def _describe_longest(workload) -> str:
    prefix = f" + workload.shared_prefix_len {workload.shared_prefix_len}" if workload.shared_prefix_len else ""
    return (f"{longest_request(workload)} tokens (workload.max_prompt_len {workload.max_prompt_len}{prefix} "
            f"+ workload.max_output_len {workload.max_output_len})")


# ----- top level --------------------------------------------------------------------------------
def _top_level(config) -> Iterator[Problem]:
    first = config.runs[0]
    group = next(g for g in REPORT_GROUPS if first.engine in g)
    for i, run in enumerate(config.runs):
        if run.engine not in group:
            yield (f"runs[{i}].engine", f"{run.engine!r} (run {run.name!r}) cannot share an experiment with "
                   f"{first.engine!r} (runs[0]): the results table and plot are one kind per experiment; allowed "
                   f"beside {first.engine!r}: {', '.join(group)}")
    if config.warmup == "precompile":
        for i, run in enumerate(config.runs):
            if run.engine not in PRECOMPILE_ENGINES:
                yield (f"runs[{i}].engine", f"run {run.name!r} (engine {run.engine!r}) cannot precompile; "
                       f"with warmup: precompile allowed engines: {', '.join(PRECOMPILE_ENGINES)} (or set "
                       "warmup: untimed_pass)")
    if config.request_rates is None:
        if "latency_bound_s_per_token" in config.model_fields_set:
            yield ("latency_bound_s_per_token", "applies only to a rate sweep (set request_rates too, or "
                   "remove it)")
    else:
        for i, run in enumerate(config.runs):
            if run.engine not in SWEEP_ENGINES:
                yield (f"runs[{i}].engine", f"run {run.name!r} (engine {run.engine!r}) cannot be swept over "
                       f"request_rates: it serves no requests on a clock; allowed engines in a sweep: "
                       f"{', '.join(SWEEP_ENGINES)}")
        if "request_rate" in config.workload.model_fields_set:
            yield ("workload.request_rate", "a rate sweep replaces it by each of request_rates; remove it")
        if "check_same_outputs" in config.model_fields_set:
            yield ("check_same_outputs", "a rate sweep does not compare outputs; remove it (or request_rates)")
        if config.claims:
            yield ("claims", "claims are not evaluated in a rate sweep (its runs are named <run>@<rate>); "
                   "remove them (or request_rates)")
    if "random_weights" in config.model_fields_set and str(config.model).endswith(".gguf"):
        yield ("random_weights", "applies to a model preset or a HF checkpoint folder; a .gguf model "
               "always loads its weights: remove it")


def _claims(config) -> Iterator[Problem]:
    engines = {run.name: run.engine for run in config.runs}
    for i, claim in enumerate(config.claims):
        for key in ("run", "ratio_to"):
            name = getattr(claim, key)
            if name is None:
                continue
            if name not in engines:
                yield (f"claims[{i}].{key}", f"unknown run {name!r}; allowed: {list(engines)}")
                continue
            allowed = claimable_metrics(engines[name])
            if claim.metric not in allowed:
                named = "run" if key == "run" else "ratio_to run"
                yield (f"claims[{i}].metric", f"{claim.metric!r} is not a metric of {named} {name!r} "
                       f"(engine {engines[name]!r}); allowed: {', '.join(allowed)}")


# ----- per run (paths relative to runs[i]) ------------------------------------------------------
def _ignored(run, key: str, applies: bool, where: str) -> Iterator[tuple[str, str]]:
    """`key` set in the YAML although this run ignores it."""
    if key in run.model_fields_set and not applies:
        yield (key, f"applies only {where}; this run ignores it: remove it (got {getattr(run, key)!r})")


def _pallas_block_size(run) -> Iterator[tuple[str, str]]:
    if run.backend == "paged" and not is_pow2(run.block_size):
        yield ("block_size", f"backend 'paged' (the Pallas kernels, paged_attention/decode_kernel.py and "
               f"prefill_kernel.py) needs a power of two: Triton tiles are power-of-two sized; allowed: 1, 2, "
               f"4, 8, 16, 32, 64, 128, 256, ... (got {run.block_size})")


# A continuous run's keys that are EngineConfig fields (all of them but `mesh` and `seed`): the run
# passes them to EngineConfig as given (experiments/continuous_engine.py `engine_config`).
ENGINE_KEYS = tuple(f.name for f in dataclasses.fields(EngineConfig) if f.name not in ("mesh", "seed"))


def engine_settings(run, *, max_model_len: int = 1) -> EngineConfig:
    """A continuous run's settings as the engine's own rules resolve and check them
    (EngineConfigError naming the field); an unset max_model_len is `max_model_len`."""
    return EngineConfig(**{key: getattr(run, key) for key in ENGINE_KEYS if key != "max_model_len"},
                        max_model_len=run.max_model_len or max_model_len)


def _continuous(run, workload) -> Iterator[tuple[str, str]]:
    try:  # first the preset alone: which keys apply depends on it
        settings = EngineConfig(policy=run.policy, admission=run.admission, kv_memory=run.kv_memory,
                                chunked_prefill=run.chunked_prefill)
    except EngineConfigError as e:
        yield (e.field, str(e))
        return
    paged, name = settings.paged, settings.name
    reserved_iteration = not paged and not settings.batch_admission
    ignored = [*_ignored(run, "reservation", reserved_iteration, "under policy 'request_level'"),
               *_ignored(run, "preemption", paged, "under policies 'continuous' and 'chunked_prefill' "
                         f"(policy {name!r} reserves each request's KV up front and never preempts)"),
               *_ignored(run, "num_cpu_blocks", paged and run.preemption == "swap", "with preemption 'swap'"),
               *_ignored(run, "enable_prefix_caching", paged, "on paged KV memory (policies 'continuous' and "
                         f"'chunked_prefill', or kv_memory 'paged'; policy {name!r} does not share blocks)")]
    yield from ignored
    try:  # then every setting, by the engine's rules
        engine_settings(run)
    except EngineConfigError as e:
        if e.field not in {key for key, _ in ignored}:
            yield (e.field, str(e))
    yield from _pallas_block_size(run)
    bs = run.block_size
    longest = longest_request(workload)
    if run.max_model_len is not None and longest is not None and longest > run.max_model_len:
        yield ("max_model_len", f"{run.max_model_len} is below the workload's longest request: up to "
               f"{_describe_longest(workload)}; allowed: >= {longest}, or unset (the workload's longest)")
        return
    model_len = run.max_model_len or (round_up(longest, bs) if longest is not None else None)
    if model_len is not None and round_up(model_len, bs) > run.num_blocks * bs:
        source = ("max_model_len" if run.max_model_len else
                  f"unset max_model_len: the workload's longest request, up to {longest} tokens, in whole blocks")
        yield ("num_blocks", f"{run.num_blocks} blocks of {bs} tokens cannot hold one request of {model_len} "
               f"tokens ({source}); allowed: >= {-(-model_len // bs)}")


def _attention_bench(run, workload) -> Iterator[tuple[str, str]]:
    yield from _ignored(run, "block_size", run.backend != "contiguous", "to the paged backends "
                        "('paged_reference', 'paged')")
    yield from _pallas_block_size(run)


def _fusion_bench(run, workload) -> Iterator[tuple[str, str]]:
    decode = run.phase == "decode"
    yield from _ignored(run, "batch_size", decode, "to phase 'decode'")
    yield from _ignored(run, "context_len", decode, "to phase 'decode'")
    yield from _ignored(run, "prompt_len", not decode, "to phase 'prefill'")
    yield from _pallas_block_size(run)
    if run.fuse_weights and run.kernels != "xla":
        yield ("fuse_weights", f"applies to kernels 'xla' only (the pallas set always runs on fused weights, the "
               f"unfused set never does), got kernels {run.kernels!r}; allowed: false")
    longest, limit = (run.context_len if decode else run.prompt_len), 80 * run.block_size
    if longest > limit:  # experiments/decode_step.py scattered_runner: 80 blocks a sequence
        yield ("context_len" if decode else "prompt_len",
               f"{longest} tokens exceed the benchmark's 80 blocks of {run.block_size}; allowed: <= {limit}")


def _quant_eval(run, workload) -> Iterator[tuple[str, str]]:
    yield from _ignored(run, "calibration_windows", run.quantization in CALIBRATED_SCHEMES,
                        f"to the calibrated schemes {list(CALIBRATED_SCHEMES)}")
    longest = max(run.context_len, run.prompt_len)
    if longest > 80 * 16:  # experiments/decode_step.py scattered_runner: 80 blocks of 16 a sequence
        yield ("context_len" if run.context_len >= run.prompt_len else "prompt_len",
               f"{longest} tokens exceed the benchmark's 80 blocks of 16; allowed: <= {80 * 16}")


def _sharing(run, workload) -> Iterator[tuple[str, str]]:
    yield from _ignored(run, "max_requests", run.mode == "beam_search", "to mode 'beam_search'")
    yield from _ignored(run, "seed", run.mode == "parallel_sampling", "to mode 'parallel_sampling'")


def _memory_sim(run, workload) -> Iterator[tuple[str, str]]:
    paged = run.reservation == "paged"
    yield from _ignored(run, "block_size", paged, "to reservation 'paged'")
    yield from _ignored(run, "watermark", paged, "to reservation 'paged'")
    longest = longest_request(workload)
    if workload.kind == "fixed" and longest > run.max_len:
        yield ("max_len", f"{run.max_len} is below every request of the fixed workload: "
               f"{_describe_longest(workload)}; allowed: >= {longest}")
        return
    need, why = _largest_reservation(run, workload)
    if paged:
        blocks = -(-need // run.block_size)
        num_blocks = run.kv_budget_tokens // run.block_size
        if num_blocks - int(run.watermark * num_blocks) < blocks:
            smallest = blocks  # the fewest blocks whose share above the watermark holds `blocks`
            while smallest - int(run.watermark * smallest) < blocks:
                smallest += 1
            yield ("kv_budget_tokens", f"{run.kv_budget_tokens} cannot hold one request: {why}, i.e. "
                   f"{blocks} blocks of block_size {run.block_size}, above the watermark ({run.watermark:g} "
                   f"of the blocks), so the simulation would wait forever; allowed: >= "
                   f"{smallest * run.block_size} (or lower max_len / the workload caps)")
    elif run.kv_budget_tokens < need:
        yield ("kv_budget_tokens", f"{run.kv_budget_tokens} cannot hold one request's reservation: {why}, so "
               f"the simulation would wait forever; allowed: >= {need}"
               + ("" if run.reservation == "max" else " (or lower max_len / the workload caps)"))


def _largest_reservation(run, workload) -> tuple[int, str]:
    """The most KV slots one request can reserve in a memory simulation (paged: prompt + output
    tokens), and why. A request has prompt + output <= max_len (the simulation rejects longer ones)
    and at most the workload's caps."""
    max_len = run.max_len
    if run.reservation == "max":
        return max_len, f"reservation 'max' reserves max_len = {max_len} slots per request"
    longest = longest_request(workload)
    bound = (_describe_longest(workload) if longest is not None and longest <= max_len
             else f"{max_len} tokens (max_len)")
    if run.reservation in ("oracle", "paged"):
        return min(longest or max_len, max_len), f"a request can have prompt + output up to {bound}"
    # pow2: prompt + the output length rounded up to a power of two. Within one power-of-two step the
    # prompt can only shrink as the output grows, so the worst output is 1, 2, 2^k + 1 or the cap.
    prompt_cap = max_len - 1 if workload.max_prompt_len is None else \
        workload.max_prompt_len + workload.shared_prefix_len
    output_cap = min(max_len - 1, workload.max_output_len or max_len)
    outputs = {1, 2, output_cap} | {2**k + 1 for k in range(output_cap.bit_length())}
    worst, worst_output = max((min(prompt_cap, max_len - o) + pow2_at_least(o), o)
                              for o in outputs if 1 <= o <= output_cap and max_len - o >= 1)
    return worst, (f"reservation 'pow2' reserves prompt + output rounded up to a power of two, up to {worst} "
                   f"slots (output {worst_output} -> {pow2_at_least(worst_output)}) for requests of up to {bound}")


def _parallel_eval(run, workload) -> Iterator[tuple[str, str]]:
    yield from _ignored(run, "microbatches", run.pp > 1, "to pipeline runs (pp > 1)")
    if run.offload_layers and run.tp * run.pp > 1:
        yield ("offload_layers", f"applies to one device (tp = pp = 1); got tp {run.tp}, pp {run.pp}")
    if run.batch_size % run.microbatches:
        yield ("microbatches", f"must divide batch_size={run.batch_size} (equal micro-batches); got "
               f"{run.microbatches}, allowed: {[d for d in range(1, run.batch_size + 1) if run.batch_size % d == 0]}")


def _none(run, workload) -> Iterator[tuple[str, str]]:
    return iter(())


_RUN_CHECKS = {"continuous": _continuous, "attention_bench": _attention_bench,
               "sharing_sim": _sharing, "memory_sim": _memory_sim, "static": _none, "hf": _none,
               "llama-cpp": _none, "gemm_roofline": _none, "fusion_bench": _fusion_bench,
               "quant_eval": _quant_eval, "llama-cpp-quant": _none, "parallel_eval": _parallel_eval,
               "parallel_projection": _none}
