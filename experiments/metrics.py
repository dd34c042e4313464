"""Turn a run's trace into the metrics named in docs/results.md (units in the names)."""

from __future__ import annotations

import numpy as np

from experiments.trace import RunTrace


def summarize(trace: RunTrace) -> dict[str, float | int | None]:
    """Throughput, latency percentiles, TTFT and KV-memory figures of one run."""
    if trace.simulated:
        return summarize_simulation(trace)
    records = trace.records
    latency = np.array([r.finish_s - r.arrival_s for r in records])
    ttft = np.array([r.first_token_s - r.arrival_s for r in records])
    output_lens = np.array([r.output_len for r in records])
    useful = int(output_lens.sum())
    return {
        "output_tokens_per_s": useful / trace.wall_s,
        "requests_per_s": len(records) / trace.wall_s,
        "latency_mean_s": float(latency.mean()),
        "latency_p50_s": float(np.percentile(latency, 50)),
        "latency_p99_s": float(np.percentile(latency, 99)),
        "ttft_mean_s": float(ttft.mean()),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "normalized_latency_s_per_token": float(np.mean(latency / output_lens)),
        "kv_bytes_allocated_peak": int(trace.kv_bytes_allocated_peak),
        "kv_bytes_used_peak": int(trace.kv_bytes_used_peak),
        "kv_utilization": trace.kv_utilization,
        "output_tokens": useful,
        "generated_tokens": int(trace.generated_tokens),
        "wasted_token_fraction": 1.0 - useful / max(1, trace.generated_tokens),
        "prefill_time_fraction": trace.prefill_s / trace.wall_s,
        "wall_s": trace.wall_s,
        "startup_s": trace.startup_s,
        "warmup_s": trace.warmup_s,
        "startup_compilations": trace.startup_compilations,
        "startup_compile_s": trace.startup_compile_s,
        "num_compilations": trace.num_compilations,
        **trace.extra_metrics,
    }


def summarize_simulation(trace: RunTrace) -> dict[str, float | int | None]:
    """Memory figures of a simulated run, whose clock counts model iterations (a micro-benchmark,
    which serves no requests, reports only its own figures)."""
    if not trace.records:
        return {"kv_bytes_allocated_peak": int(trace.kv_bytes_allocated_peak), **trace.extra_metrics}
    latency = np.array([r.finish_s - r.arrival_s for r in trace.records])
    useful = sum(r.output_len for r in trace.records)
    return {
        "kv_utilization": trace.kv_utilization,
        "kv_bytes_allocated_peak": int(trace.kv_bytes_allocated_peak),
        "kv_bytes_used_peak": int(trace.kv_bytes_used_peak),
        "output_tokens_per_iteration": useful / trace.wall_s,
        "latency_mean_iterations": float(latency.mean()),
        **trace.extra_metrics,
    }
