"""The markdown tables the harness prints and the docs render, from results-file dicts alone (no
plotting, no engine): the runs table (its columns chosen by the kind of run), the paper-claims table,
the token-agreement lines and the request-rate sweep table. `report.py` (which writes results
files) and `render_docs.py` (which re-renders the docs) both read from here.
"""

from __future__ import annotations

TABLE_COLUMNS = [
    ("output_tokens_per_s", "output tok/s", "{:.1f}"),
    ("requests_per_s", "req/s", "{:.3f}"),
    ("latency_mean_s", "latency mean s", "{:.2f}"),
    ("latency_p50_s", "p50 s", "{:.2f}"),
    ("latency_p99_s", "p99 s", "{:.2f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.2f}"),
    ("kv_bytes_allocated_peak", "KV peak MB", "{:.1f}"),
    ("kv_bytes_used_peak", "KV real-token MB", "{:.1f}"),
    ("kv_utilization", "KV util", "{:.1%}"),
    ("wasted_token_fraction", "wasted tok", "{:.1%}"),
    ("prefill_time_fraction", "prefill time", "{:.0%}"),
    ("normalized_latency_s_per_token", "norm. latency s/tok", "{:.3f}"),
    ("inter_token_latency_p95_s", "ITL p95 s", "{:.3f}"),  # continuous engine only
    ("num_preemptions", "preempted", "{:d}"),  # continuous engine only
    ("cached_prompt_token_fraction", "cached prompt", "{:.0%}"),  # shown only where some run cached any
    ("startup_s", "startup s", "{:.1f}"),
    ("startup_compilations", "startup compiles", "{:d}"),
    ("num_compilations", "timed compiles", "{:d}"),
    ("same_tokens_fraction", "same tokens", "{:.0%}"),
]
# memory simulations (no clock): what the KV budget holds and how many requests it batches
SIMULATION_COLUMNS = [
    ("kv_utilization", "KV util (real tokens / budget)", "{:.1%}"),
    ("mean_batched_requests", "mean batched requests", "{:.1f}"),
    ("max_concurrent_requests", "max concurrent", "{:d}"),
    ("preemptions", "preemptions", "{:d}"),
    ("output_tokens_per_iteration", "output tok / iteration", "{:.1f}"),
    ("kv_bytes_allocated_peak", "KV budget MB", "{:.1f}"),
]
# block sharing (vLLM Fig. 15); a "config." key is read from the run's config, not its metrics
SHARING_COLUMNS = [
    ("config.mode", "mode", "{}"),
    ("config.width", "n / beam width", "{:d}"),
    ("memory_saved_fraction", "memory saved", "{:.1%}"),
    ("blocks_with_sharing_mean", "blocks with sharing (mean)", "{:.1f}"),
    ("blocks_without_sharing_mean", "blocks without sharing (mean)", "{:.1f}"),
    ("cow_copies", "CoW copies", "{:d}"),
    ("num_requests", "requests", "{:d}"),
]
# attention micro-benchmarks: the last column is time relative to the first run
KERNEL_COLUMNS = [
    ("config.backend", "backend", "{}"),
    ("config.batch_size", "batch", "{:d}"),
    ("config.context_len", "context", "{:d}"),
    ("config.block_size", "block", "{:d}"),
    ("attention_us_per_call", "attention us / call", "{:.1f}"),
    ("kv_gb_per_s", "KV read GB/s", "{:.1f}"),
    ("device", "device", "{}"),
]
# decode speed (batch 1 vs llama.cpp, large batch vs the GEMM roofline): the last column is decode
# tokens/s relative to the first run
DECODE_COLUMNS = [
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("mean_seqs_per_step", "seqs / step", "{:.1f}"),
    ("output_tokens_per_s", "output tok/s (with prefill)", "{:.1f}"),
    ("gemm_gflops", "GEMM GFLOP/s (XLA)", "{:.0f}"),
    ("gemm_gflops_torch", "GEMM GFLOP/s (torch)", "{:.0f}"),
    ("num_compilations", "compiles", "{:d}"),
]
# kernel fusion: one decoder layer and its ops under one ops set (times in µs; None off a GPU for pallas)
FUSION_COLUMNS = [
    ("config.kernels", "kernels", "{}"),
    ("config.phase", "phase", "{}"),
    ("num_tokens", "tokens", "{:d}"),
    ("add_rms_norm_us", "add+norm us", "{:.0f}"),
    ("qkv_rope_us", "qkv+rope us", "{:.0f}"),
    ("attention_us", "attention us", "{:.0f}"),
    ("self_attention_us", "qkv..attention us", "{:.0f}"),
    ("o_proj_us", "o_proj us", "{:.0f}"),
    ("swiglu_mlp_us", "mlp us", "{:.0f}"),
    ("layer_us", "layer us", "{:.0f}"),
    ("step_ms", "step ms", "{:.1f}"),
    ("programs_per_layer", "programs / layer", "{:d}"),
    ("xla_fusions_per_layer", "XLA fusions / layer", "{:d}"),
    ("pallas_kernels_per_layer", "Pallas kernels / layer", "{:d}"),
    ("layer_max_abs_diff", "max abs diff vs xla", "{:.1e}"),
]
# quantization: one scheme per run, size / accuracy / speed (speed None for block formats)
QUANT_COLUMNS = [
    ("config.quantization", "scheme", "{}"),
    ("config.kv_cache_dtype", "KV cache", "{}"),
    ("bits_per_weight", "bits / weight", "{:.2f}"),
    ("model_bytes", "model MB", "{:.1f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("prompt_perplexity", "prompt ppl", "{:.3f}"),
    ("logit_max_abs_err", "logit max err", "{:.3f}"),
    ("logit_mean_abs_err", "logit mean err", "{:.4f}"),
    ("top1_agreement", "top-1 agree", "{:.1%}"),
    ("decode_b1_tokens_per_s", "decode b1 tok/s", "{:.1f}"),
    ("decode_b1_speedup", "b1 vs f32 (same run)", "{:.2f}x"),
    ("decode_b64_tokens_per_s", "decode b64 tok/s", "{:.0f}"),
    ("decode_b64_speedup", "b64 vs f32 (same run)", "{:.2f}x"),
    ("prompt_tokens_per_s", "prompt tok/s", "{:.0f}"),
    ("block_formats_used", "formats used", "{}"),
]
# parallelism: one tp x pp layout per run; bytes per device, traffic per step (KB), times on fake devices
PARALLEL_COLUMNS = [
    ("config.tp", "tp", "{}"),
    ("config.pp", "pp", "{}"),
    ("config.offload_layers", "layers on host", "{}"),
    ("param_bytes_per_device", "params MB / device", "{:.1f}"),
    ("host_param_bytes", "params MB on host", "{:.1f}"),
    ("kv_bytes_per_device", "KV MB / device", "{:.2f}"),
    ("collectives_per_decode_step", "collectives / decode step", "{:d}"),
    ("allreduce_bytes_per_decode_step", "all-reduce KB (HLO)", "{:.0f}"),
    ("megatron_allreduce_bytes_per_decode_step", "all-reduce KB (Megatron)", "{:.0f}"),
    ("allgather_bytes_per_decode_step", "all-gather KB (HLO)", "{:.0f}"),
    ("stage_handoff_bytes_per_decode_step", "stage hand-off KB / decode step", "{:.0f}"),
    ("decode_step_ms", "decode step ms", "{:.1f}"),
    ("prefill_ms", "prefill ms", "{:.0f}"),
    ("logit_max_abs_gap", "max logit gap vs 1 device", "{:.1e}"),
]
# projection: a published model's smallest layout on one GPU type (arithmetic, not measured)
PROJECTION_COLUMNS = [
    ("config.model_shape", "model", "{}"),
    ("config.gpu", "GPU", "{}"),
    ("tp", "tp", "{:d}"),
    ("pp", "pp", "{:d}"),
    ("weights_gib_per_device", "weights GiB / device", "{:.1f}"),
    ("kv_gib_per_device", "KV GiB / device", "{:.1f}"),
    ("allreduces_per_token", "all-reduces / token", "{:d}"),
    ("allreduce_mb_per_token", "all-reduce MB / token", "{:.2f}"),
    ("ring_us_per_token", "ring us / token (NVLink)", "{:.1f}"),
    ("hbm_decode_step_ms_lower_bound", "decode step ms >= (HBM)", "{:.2f}"),
    ("recommended", "published advice", "{}"),
]
_KB = {"allreduce_bytes_per_decode_step", "megatron_allreduce_bytes_per_decode_step",
       "allgather_bytes_per_decode_step", "stage_handoff_bytes_per_decode_step"}
_MB = {"kv_bytes_allocated_peak", "kv_bytes_used_peak", "model_bytes", "param_bytes_per_device",
       "kv_bytes_per_device", "host_param_bytes"}
_SHOWN_WHEN_NONZERO = {"cached_prompt_token_fraction"}  # prefix caching: a column of zeros elsewhere
# table kind -> (columns, metric of the last column's ratio to the first run; None: no such column)
_TABLES = {"serving": (TABLE_COLUMNS, "output_tokens_per_s"),
           "simulation": (SIMULATION_COLUMNS, "output_tokens_per_iteration"),
           "sharing": (SHARING_COLUMNS, None),
           "kernel": (KERNEL_COLUMNS, "attention_us_per_call"),
           "fusion": (FUSION_COLUMNS, None),
           "quantization": (QUANT_COLUMNS, None),
           "parallel": (PARALLEL_COLUMNS, None),
           "projection": (PROJECTION_COLUMNS, None),
           "decode": (DECODE_COLUMNS, "decode_tokens_per_s")}


def _table_kind(runs: list[dict]) -> str:
    """'sharing', 'kernel', 'simulation' (memory, no clock), 'decode' (a roofline or llama.cpp run
    beside ours) or 'serving', by the runs' metrics."""
    if all("memory_saved_fraction" in run["metrics"] for run in runs):
        return "sharing"
    if all("attention_us_per_call" in run["metrics"] for run in runs):
        return "kernel"
    if all("layer_us" in run["metrics"] for run in runs):
        return "fusion"
    if all("perplexity" in run["metrics"] for run in runs):
        return "quantization"
    if all("param_bytes_per_device" in run["metrics"] for run in runs):
        return "parallel"
    if all("ring_us_per_token" in run["metrics"] for run in runs):
        return "projection"
    if all("output_tokens_per_iteration" in run["metrics"] for run in runs):
        return "simulation"
    if any("gemm_gflops" in run["metrics"] for run in runs) or any(
            run["config"].get("engine") == "llama-cpp" for run in runs):
        return "decode"
    return "serving"


def _value(run: dict, key: str):
    if key.startswith("config."):
        return run["config"].get(key.removeprefix("config."))
    return run["metrics"].get(key)


def markdown_table(runs: list[dict]) -> str:
    """One row per run; for timed runs and memory simulations the last column is throughput
    relative to the first run."""
    columns, speed = _TABLES[_table_kind(runs)]
    columns = [c for c in columns if c[0] not in _SHOWN_WHEN_NONZERO or any(_value(run, c[0]) for run in runs)]
    header = ["run"] + [title for _, title, _ in columns] + ([f"vs {runs[0]['name']}"] if speed else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = runs[0]["metrics"].get(speed) if speed else None
    for run in runs:
        m = run["metrics"]
        cells = [run["name"]]
        for key, _, fmt in columns:
            value = _value(run, key)
            scale = 1e6 if key in _MB else 1e3 if key in _KB else 1
            cells.append("-" if value is None else fmt.format(value / scale if scale > 1 else value))
        if speed:
            cells.append(f"{m[speed] / base:.2f}x" if base and m.get(speed) is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_table(claims: list[dict]) -> str:
    """Paper number beside ours, for experiments that reproduce a published claim."""
    lines = ["| claim | source | paper | ours | unit |", "|---|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c['claim']} | {c['source']} | {c['paper']} | {c['ours']:.3g} | {c['unit']} |")
    return "\n".join(lines)


def agreement_lines(agreement: dict[str, dict]) -> str:
    """One markdown bullet per run: its requests with the reference run's tokens (`token_agreement`
    of results.json); printed under the runs table and rendered under it in the docs."""
    return "\n".join(f"- `{name}`: {a['same_requests']}/{a['num_requests']} requests with the same tokens as "
                     f"`{a['reference']}`" + (" (informational: another framework)" if a.get("informational") else "")
                     for name, a in agreement.items())


def sustained_rates(config, runs: list[dict]) -> dict[str, float | None]:
    """Per run: the highest swept rate below which every rate keeps normalized latency under the
    bound (None: not even the lowest)."""
    best: dict[str, float | None] = {r.name: None for r in config.runs}
    for base in best:
        points = sorted((run["config"]["request_rate"], run["metrics"]["normalized_latency_s_per_token"])
                        for run in runs if run["config"]["name"] == base)
        for rate, latency in points:
            if latency > config.latency_bound_s_per_token:
                break
            best[base] = rate
    return best


def sweep_table(config, runs: list[dict]) -> str:
    rates = config.request_rates
    lines = ["| run | " + " | ".join(f"{r:g} req/s" for r in rates) + " | sustained rate |",
             "|---|" + "---|" * (len(rates) + 1)]
    by_name = {run["name"]: run["metrics"] for run in runs}
    for base, sustained in sustained_rates(config, runs).items():
        cells = [f"{by_name[f'{base}@{r:g}']['normalized_latency_s_per_token']:.3f}" for r in rates]
        lines.append(f"| {base} | " + " | ".join(cells) + f" | {'-' if sustained is None else f'{sustained:g}'} |")
    return ("normalized latency (s/token) by request rate; sustained = highest rate at <= "
            f"{config.latency_bound_s_per_token:g} s/token\n" + "\n".join(lines))
