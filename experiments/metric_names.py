"""Which metrics each engine reports: the keys of a run's `metrics` in results.json.

A claim (`claims[i].metric` in a config) names one of them; the config is checked against this
registry before any model loads, so a typo fails in milliseconds instead of after every run.

The names come from `experiments/metrics.py` (`summarize`: the serving set; `summarize_simulation`:
the simulation set, or only `kv_bytes_allocated_peak` for a micro-benchmark that serves no requests)
plus each engine's own `RunTrace.extra_metrics`, plus `same_tokens_fraction`, which
`experiments/run.py` adds to every run that records its tokens when two or more runs did. tests/experiments/test_metric_names.py runs every
engine and asserts it reports exactly these names, so the registry cannot drift from the code: add a
metric there and the test names the registry entry to update.

Plain data, no imports: `experiments/config.py` reads it without loading jax.
"""

from __future__ import annotations

# experiments/metrics.py `summarize`: engines that serve requests on a clock of seconds
SERVING = ("output_tokens_per_s", "requests_per_s", "latency_mean_s", "latency_p50_s", "latency_p99_s",
           "ttft_mean_s", "ttft_p50_s", "normalized_latency_s_per_token", "kv_bytes_allocated_peak",
           "kv_bytes_used_peak", "kv_utilization", "output_tokens", "generated_tokens",
           "wasted_token_fraction", "prefill_time_fraction", "wall_s", "startup_s", "warmup_s",
           "startup_compilations", "startup_compile_s", "num_compilations")
# `summarize_simulation` with request records: simulations whose clock counts model iterations
SIMULATION = ("kv_utilization", "kv_bytes_allocated_peak", "kv_bytes_used_peak", "output_tokens_per_iteration",
              "latency_mean_iterations")
# `summarize_simulation` without records: micro-benchmarks that serve no requests
MICRO_BENCHMARK = ("kv_bytes_allocated_peak",)
# the quantization table's metrics, ours (quant_eval) and llama.cpp's (llama-cpp-quant)
QUANT_METRICS = ("bits_per_weight", "model_bytes", "perplexity", "perplexity_tokens", "prompt_perplexity",
                 "logit_max_abs_err", "logit_mean_abs_err", "top1_agreement", "decode_b1_tokens_per_s",
                 "decode_b64_tokens_per_s", "prompt_tokens_per_s", "block_formats_used")
# ours only: each speed over the unquantized model's, both timed alternately in the same run
QUANT_SPEEDUPS = ("decode_b1_speedup", "decode_b64_speedup", "prompt_speedup")

# the parallelism table's metrics (experiments/parallel_eval.py)
PARALLEL_METRICS = ("devices", "param_bytes_per_device", "host_param_bytes", "kv_bytes_per_device", "collectives_per_decode_step",
                    "allreduce_bytes_per_decode_step", "allgather_bytes_per_decode_step",
                    "megatron_allreduce_bytes_per_decode_step", "stage_handoff_bytes_per_decode_step",
                    "decode_step_ms", "prefill_ms", "logit_max_abs_gap")

# the projection table's metrics (experiments/parallel_projection.py, distributed/projection.py)
PROJECTION_METRICS = ("tp", "pp", "weights_gib_per_device", "kv_gib_per_device", "allreduces_per_token",
                      "allreduce_mb_per_token", "ring_us_per_token", "hbm_decode_step_ms_lower_bound",
                      "recommended", "recommended_url")

# experiments/fusion_bench.py `OPS`: the ops of a decoder layer it times, then the whole layer
FUSION_OPS = ("add_rms_norm", "qkv_rope", "attention", "self_attention", "o_proj", "swiglu_mlp", "layer")

# experiments/run.py `token_agreement`: runs whose engine records its tokens, when two or more did
TOKEN_AGREEMENT = ("same_tokens_fraction",)
RECORDS_TOKENS = ("static", "hf", "continuous", "llama-cpp")

# engine (the YAML `engine:` tag) -> (base set, its RunTrace.extra_metrics, in the engine's module)
_ENGINES = {
    "static": (SERVING, ()),  # experiments/static_engine.py
    "hf": (SERVING, ("torch_threads", "attn_implementation")),  # experiments/baselines/hf_generate.py
    "continuous": (SERVING, ("num_steps", "num_preemptions", "padded_steps", "mean_seqs_per_step", "prefill_steps",
                             "decode_tokens_per_s", "inter_token_latency_p50_s",
                             "inter_token_latency_p95_s", "prefix_cache_hit_rate",
                             "cached_prompt_token_fraction")),  # experiments/continuous_engine.py
    "llama-cpp": (SERVING, ("decode_tokens_per_s", "mean_seqs_per_step")),  # experiments/baselines/llama_cpp.py
    "memory_sim": (SIMULATION, ("mean_batched_requests", "max_concurrent_requests", "iterations",
                                "saturated_iterations", "preemptions", "recomputed_tokens",
                                "sim_seconds")),  # experiments/memory_sim.py
    "sharing_sim": (SIMULATION, ("memory_saved_fraction", "blocks_with_sharing_mean",
                                 "blocks_without_sharing_mean", "cow_copies", "iterations", "num_requests",
                                 "generated_tokens", "sim_seconds")),  # experiments/sharing.py
    "attention_bench": (MICRO_BENCHMARK, ("attention_us_per_call", "kv_gb_per_s",
                                          "device")),  # experiments/attention_bench.py
    "fusion_bench": (MICRO_BENCHMARK, ("device", "num_tokens", "step_ms", "programs_per_layer",
                                       "pallas_kernels_per_layer", "xla_fusions_per_layer", "layer_max_abs_diff",
                                       *(f"{op}_us" for op in FUSION_OPS),
                                       *(f"{op}_{kind}" for op in FUSION_OPS[:-1]
                                         for kind in ("bytes", "bytes_unfused", "gb_per_s")))),
    # experiments/fusion_bench.py
    "quant_eval": (MICRO_BENCHMARK, (*QUANT_METRICS, *QUANT_SPEEDUPS)),  # experiments/quant_eval.py
    "llama-cpp-quant": (MICRO_BENCHMARK, QUANT_METRICS),  # experiments/baselines/llama_cpp_quant.py
    "parallel_eval": (MICRO_BENCHMARK, PARALLEL_METRICS),  # experiments/parallel_eval.py
    "parallel_projection": (MICRO_BENCHMARK, PROJECTION_METRICS),  # experiments/parallel_projection.py
    "gemm_roofline": (MICRO_BENCHMARK, ("gemm_gflops", "gemm_gflops_torch", "decode_tokens_per_s",
                                        "flops_per_token")),  # experiments/roofline.py
}

# engine -> every metric name its runs report
METRICS: dict[str, frozenset[str]] = {
    engine: frozenset(base) | frozenset(extra) | frozenset(TOKEN_AGREEMENT if engine in RECORDS_TOKENS else ())
    for engine, (base, extra) in _ENGINES.items()}

# Metrics an engine reports as text (or None), so a claim cannot divide by them: the HF baseline's
# attention implementation and the attention benchmark's jax backend.
NOT_NUMBERS: dict[str, frozenset[str]] = {
    "hf": frozenset({"attn_implementation"}),
    "attention_bench": frozenset({"device"}),
    "fusion_bench": frozenset({"device"}),
    "quant_eval": frozenset({"block_formats_used"}),
    "llama-cpp-quant": frozenset({"block_formats_used"}),
    "parallel_projection": frozenset({"recommended", "recommended_url"}),
}

# Engines a rate sweep (`request_rates`) can run: those that replay arrivals in real time and report
# the normalized latency the sweep's sustained rate is judged by.
SWEEP_ENGINES = tuple(e for e, names in METRICS.items() if "normalized_latency_s_per_token" in names)


def claimable_metrics(engine: str) -> list[str]:
    """The numeric metrics of `engine`'s runs, sorted: what a claim may name."""
    return sorted(METRICS[engine] - NOT_NUMBERS.get(engine, frozenset()))
