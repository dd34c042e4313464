"""Write results: markdown table (stdout), results.json / results.csv, and a PNG plot.

results.json follows the schema in docs/results.md:
    {"experiment", "model", "workload", "runs": [{"name", "config", "metrics"}], "claims": [...],
     "provenance": {git commit, date, command, versions, CPUs}}

`python -m experiments.report docs/results/ [--check]` re-renders the tables in README.md and
docs/*.md from the committed results files (experiments/render_docs.py).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from experiments.provenance import collect_provenance  # noqa: E402

# (metric key, column header, format) shown in the stdout table
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
_MB = {"kv_bytes_allocated_peak", "kv_bytes_used_peak"}
# table kind -> (columns, metric of the last column's ratio to the first run; None: no such column)
_TABLES = {"serving": (TABLE_COLUMNS, "output_tokens_per_s"),
           "simulation": (SIMULATION_COLUMNS, "output_tokens_per_iteration"),
           "sharing": (SHARING_COLUMNS, None),
           "kernel": (KERNEL_COLUMNS, "attention_us_per_call"),
           "decode": (DECODE_COLUMNS, "decode_tokens_per_s")}


def _table_kind(runs: list[dict]) -> str:
    """'sharing', 'kernel', 'simulation' (memory, no clock), 'decode' (a roofline or llama.cpp run
    beside ours) or 'serving', by the runs' metrics."""
    if all("memory_saved_fraction" in run["metrics"] for run in runs):
        return "sharing"
    if all("attention_us_per_call" in run["metrics"] for run in runs):
        return "kernel"
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
    header = ["run"] + [title for _, title, _ in columns] + ([f"vs {runs[0]['name']}"] if speed else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = runs[0]["metrics"].get(speed) if speed else None
    for run in runs:
        m = run["metrics"]
        cells = [run["name"]]
        for key, _, fmt in columns:
            value = _value(run, key)
            cells.append("-" if value is None else fmt.format(value / 1e6 if key in _MB else value))
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


def write_results(out_dir: Path, result: dict) -> list[Path]:
    """results.json, results.csv and throughput_latency.png under out_dir; returns the paths.
    Adds `result["provenance"]` (commit, date, command, versions, CPUs) unless it is already set."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.setdefault("provenance", collect_provenance())
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(result, indent=2))
    csv_path = out_dir / "results.csv"
    metric_keys = sorted({k for run in result["runs"] for k in run["metrics"]})
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "engine"] + metric_keys)
        for run in result["runs"]:
            writer.writerow([run["name"], run["config"].get("engine")]
                            + [run["metrics"].get(k) for k in metric_keys])
    return [json_path, csv_path, plot_runs(out_dir / "throughput_latency.png", result)]


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG (110 dpi) and close a figure; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(path: Path, result: dict) -> Path:
    """Bar charts: output tokens/s, latency p50/p99, and KV memory allocated vs holding real tokens
    (for memory simulations: KV utilization and requests batched at once; for block sharing: the
    memory it saves)."""
    kind = _table_kind(result["runs"])
    if kind == "sharing":
        return plot_sharing(path, result)
    if kind == "simulation":
        return plot_simulation(path, result)
    if kind == "kernel":
        return plot_kernel(path, result)
    if kind == "decode":
        return plot_decode(path, result)
    runs = result["runs"]
    names = [r["name"] for r in runs]
    x = range(len(runs))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(x, [r["metrics"]["output_tokens_per_s"] for r in runs], color="tab:blue")
    axes[0].set_title("Throughput (output tokens/s)")
    width = 0.38
    axes[1].bar([i - width / 2 for i in x], [r["metrics"]["latency_p50_s"] for r in runs], width, label="p50")
    axes[1].bar([i + width / 2 for i in x], [r["metrics"]["latency_p99_s"] for r in runs], width, label="p99")
    axes[1].set_title("Request latency (s)")
    axes[1].legend()
    alloc = [r["metrics"]["kv_bytes_allocated_peak"] / 1e6 for r in runs]
    used = [r["metrics"]["kv_bytes_used_peak"] / 1e6 for r in runs]
    axes[2].bar(x, alloc, color="lightgray", label="reserved")
    axes[2].bar(x, used, color="tab:green", label="holding real tokens")
    axes[2].set_title("Peak KV cache (MB)")
    axes[2].legend()
    for ax in axes:
        ax.set_xticks(list(x), names, rotation=20, ha="right")
    fig.suptitle(f"{result['experiment']} - {result['model']} - {result['workload']['kind']} "
                 f"x{result['workload']['num_requests']}")
    return save_figure(fig, path)


def plot_simulation(path: Path, result: dict) -> Path:
    """KV utilization and mean batched requests per reservation policy, paper numbers beside ours."""
    runs = result["runs"]
    names = [r["name"] for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(names, [100 * r["metrics"]["kv_utilization"] for r in runs], color="tab:green")
    axes[0].set_title("KV memory holding real tokens (%)")
    axes[0].set_ylim(0, 100)
    axes[1].bar(names, [r["metrics"]["mean_batched_requests"] for r in runs], color="tab:blue")
    axes[1].set_title("Requests batched at once (mean)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"{result['experiment']} - {result['workload']['kind']} x{result['workload']['num_requests']}")
    return save_figure(fig, path)


def plot_sharing(path: Path, result: dict) -> Path:
    """Memory saved by block sharing per run (vLLM Fig. 15), one colour per mode."""
    runs = result["runs"]
    modes = sorted({r["config"].get("mode") for r in runs})
    colors = dict(zip(modes, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    saved = [100 * r["metrics"]["memory_saved_fraction"] for r in runs]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar([r["name"] for r in runs], saved, color=[colors[r["config"].get("mode")] for r in runs])
    ax.bar_label(bars, fmt="%.1f%%")
    ax.legend(handles=[Patch(color=color, label=str(mode)) for mode, color in colors.items()])
    ax.set_ylabel("KV blocks saved by sharing (%)")
    ax.set_ylim(0, max(100.0, max(saved) * 1.1))
    ax.tick_params(axis="x", rotation=20)
    ax.set_title(f"{result['experiment']} - {result['model']} - {result['workload']['kind']} "
                 f"x{result['workload']['num_requests']}")
    return save_figure(fig, path)


def plot_kernel(path: Path, result: dict) -> Path:
    """Microseconds per decode-attention call for each run (lower is better)."""
    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(runs)), 4))
    ax.bar([r["name"] for r in runs], [r["metrics"]["attention_us_per_call"] for r in runs], color="tab:purple")
    ax.set_ylabel("us per call (median)")
    ax.tick_params(axis="x", rotation=30)
    ax.set_title(f"{result['experiment']}: one layer's decode attention")
    return save_figure(fig, path)


def plot_decode(path: Path, result: dict) -> Path:
    """Decode tokens/s per run (a roofline run shows the bound the GEMM speed sets)."""
    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(runs)), 4))
    bars = ax.bar([r["name"] for r in runs], [r["metrics"]["decode_tokens_per_s"] for r in runs],
                  color=["tab:gray" if "gemm_gflops" in r["metrics"] else "tab:blue" for r in runs])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("decode tokens/s")
    ax.tick_params(axis="x", rotation=20)
    ax.set_title(f"{result['experiment']} - {result['model']}")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """`python -m experiments.report docs/results/ [--check]`: see experiments/render_docs.py."""
    from experiments.render_docs import main as render_main

    return render_main(argv)


if __name__ == "__main__":
    sys.exit(main())
