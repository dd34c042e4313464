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
from experiments.tables import _table_kind  # noqa: E402

# (metric key, column header, format) shown in the stdout table
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
    if kind == "fusion":
        return plot_fusion(path, result)
    if kind == "quantization":
        return plot_quantization(path, result)
    if kind == "parallel":
        return plot_parallel(path, result)
    if kind == "projection":
        return plot_projection(path, result)
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


def plot_fusion(path: Path, result: dict) -> Path:
    """Where one decoder layer's time goes under each ops set: each op's share of the sum of the ops
    (two add + RMSNorms a layer), with the whole layer's microseconds over the bar; runs with no
    times (Pallas interpreted) are left empty."""
    runs = result["runs"]
    parts = [("add_rms_norm_us", 2, "2 x add + RMSNorm"), ("self_attention_us", 1, "QKV + RoPE + attention"),
             ("o_proj_us", 1, "o_proj"), ("swiglu_mlp_us", 1, "SwiGLU MLP")]
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(runs)), 4.5))
    x = range(len(runs))
    totals = [sum(times * (r["metrics"].get(key) or 0.0) for key, times, _ in parts) for r in runs]
    bottom = [0.0] * len(runs)
    for key, times, label in parts:
        shares = [100 * times * (r["metrics"].get(key) or 0.0) / total if total else 0.0
                  for r, total in zip(runs, totals)]
        ax.bar(x, shares, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, shares)]
    for i, r in enumerate(runs):
        layer = r["metrics"].get("layer_us")
        ax.text(i, 101, "not timed" if layer is None else f"{layer / 1e3:.1f} ms", ha="center", fontsize=7)
    ax.set_ylim(0, 110)
    ax.set_ylabel("share of the layer's ops (%)")
    ax.set_xticks(list(x), [r["name"] for r in runs], rotation=30, ha="right")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{result['experiment']} - {result['model']}: one decoder layer by op (the whole layer's time above)")
    return save_figure(fig, path)


def plot_quantization(path: Path, result: dict) -> Path:
    """Perplexity against bits per weight (one point per scheme), and decode tokens/s at batch 1
    and 64 for the schemes that were timed."""
    runs = result["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 5))
    for r in runs:
        m, in_llama_cpp = r["metrics"], r["config"]["engine"] == "llama-cpp-quant"
        if m["bits_per_weight"] >= 16:  # the float base: a reference line, not a point far to the right
            left.axhline(m["perplexity"], color="tab:green" if in_llama_cpp else "gray", linestyle="--", linewidth=0.8)
            left.annotate(f"{r['name']} ({m['bits_per_weight']:.0f} bits)", (0.5 if in_llama_cpp else 0.01,
                          m["perplexity"]), xycoords=("axes fraction", "data"), fontsize=7, xytext=(0, 3),
                          textcoords="offset points")
            continue
        color = "tab:green" if in_llama_cpp else "tab:red" if m.get("block_formats_used") else "tab:blue"
        left.scatter(m["bits_per_weight"], m["perplexity"], color=color, marker="x" if in_llama_cpp else "o")
        left.annotate(r["name"].removeprefix("llama.cpp-") if in_llama_cpp else r["name"],
                      (m["bits_per_weight"], m["perplexity"]), fontsize=7, color=color,
                      xytext=(3, -9 if in_llama_cpp else 3), textcoords="offset points")
    left.set_xlabel("bits per weight (projections)")
    left.set_ylabel("perplexity (lee_background)")
    left.set_title("accuracy vs size (red: block formats in ours; green x: in llama.cpp)")
    timed = [r for r in runs if r["metrics"].get("decode_b1_tokens_per_s") is not None]
    x = range(len(timed))
    for offset, key, label in ((-0.2, "decode_b1_tokens_per_s", "batch 1"), (0.2, "decode_b64_tokens_per_s", "batch 64")):
        base = timed[0]["metrics"][key] if timed else 1.0
        right.bar([i + offset for i in x], [r["metrics"][key] / base for r in timed], width=0.4, label=label)
    right.axhline(1.0, color="gray", linewidth=0.8)
    right.set_xticks(list(x), [r["name"] for r in timed], rotation=45, ha="right", fontsize=7)
    right.set_ylabel(f"decode tokens/s relative to {timed[0]['name'] if timed else '-'}")
    right.legend(fontsize=8)
    right.set_title("decode speed (llama.cpp-*: llama.cpp's own kernels)")
    fig.suptitle(f"{result['experiment']} - {result['model']}")
    return save_figure(fig, path)


def plot_parallel(path: Path, result: dict) -> Path:
    """Per run: the bytes one device holds (params, KV cache; offloaded params, in host memory, on
    top), and the all-reduce bytes of a decode step as compiled beside Megatron's count."""
    runs = result["runs"]
    names, x = [r["name"] for r in runs], range(len(runs))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    params = [r["metrics"]["param_bytes_per_device"] / 1e6 for r in runs]
    kv = [(r["metrics"]["kv_bytes_per_device"] or 0) / 1e6 for r in runs]
    left.bar(x, params, label="params")
    left.bar(x, kv, bottom=params, label="KV cache")
    host = [(r["metrics"].get("host_param_bytes") or 0) / 1e6 for r in runs]
    left.bar(x, host, bottom=[p + k for p, k in zip(params, kv)], color="lightgray", hatch="//",
             label="params in host memory (offload)")
    left.set_ylabel("MB on the fullest device")
    left.set_title("memory per device")
    left.legend(fontsize=8)
    timed = [r for r in runs if r["metrics"]["allreduce_bytes_per_decode_step"] is not None]
    tx = range(len(timed))
    for offset, key, label in ((-0.2, "allreduce_bytes_per_decode_step", "all-reduce, compiled HLO"),
                               (0.2, "megatron_allreduce_bytes_per_decode_step", "all-reduce, Megatron's count")):
        right.bar([i + offset for i in tx], [r["metrics"][key] / 1e3 for r in timed], width=0.4, label=label)
    right.bar(list(tx), [r["metrics"]["allgather_bytes_per_decode_step"] / 1e3 for r in timed], width=0.15,
              color="tab:red", label="all-gather, compiled HLO")
    right.set_xticks(list(tx), [r["name"] for r in timed], rotation=30, ha="right")
    right.set_ylabel("KB per decode step")
    right.set_title("traffic between devices per decode step")
    right.legend(fontsize=8)
    left.set_xticks(list(x), names, rotation=30, ha="right")
    fig.suptitle(f"{result['experiment']} - {result['model']}")
    return save_figure(fig, path)


def plot_projection(path: Path, result: dict) -> Path:
    """Per (model, GPU): the fullest device's weights and KV cache at the projected layout."""
    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(runs)), 4.5))
    x = range(len(runs))
    weights = [r["metrics"]["weights_gib_per_device"] for r in runs]
    ax.bar(x, weights, label="weights")
    ax.bar(x, [r["metrics"]["kv_gib_per_device"] for r in runs], bottom=weights, label="KV cache")
    for i, r in enumerate(runs):
        ax.text(i, 1, f"tp {r['metrics']['tp']} x pp {r['metrics']['pp']}", ha="center", fontsize=7, color="white")
    ax.set_xticks(list(x), [r["name"] for r in runs], rotation=30, ha="right")
    ax.set_ylabel("GiB on the fullest device (projected)")
    ax.legend(fontsize=8)
    ax.set_title(f"{result['experiment']}: smallest layout that fits (arithmetic, not measured)")
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
