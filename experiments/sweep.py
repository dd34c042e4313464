"""Throughput vs request rate (vLLM Fig. 12): the same requests replayed at several Poisson rates
under every configured run; normalized latency (mean of latency / output tokens) per policy and
rate, and the highest rate each run sustains below `latency_bound_s_per_token`.

Runs are named `<run>@<rate>`; each run's untimed warm-up (all requests at once) happens once, at
its first rate (the jit cache is shared in-process, so later rates reuse its programs). Poisson
arrivals meet step shapes that warm-up never met: the continuous engine runs them on the padding of
a compiled shape that covers them (`experiments/continuous_engine.py`), so a timed replay compiles
nothing (the harness fails it otherwise) and reports how many steps ran padded (`padded_steps`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.engines import build_engine, drop_compiled_programs, warm_up_and_serve  # noqa: E402
from experiments.metrics import summarize  # noqa: E402
from experiments.report import save_figure  # noqa: E402
from experiments.workloads import Request, arrival_times  # noqa: E402
import numpy as np  # noqa: E402


def with_rate(requests: list[Request], rate: float, seed: int) -> list[Request]:
    """The same requests with Poisson arrivals at `rate` requests/s."""
    times = arrival_times(len(requests), rate, np.random.default_rng(seed))
    return [dataclasses.replace(r, arrival_s=float(t)) for r, t in zip(requests, times)]


def run_sweep(model, config, requests: list[Request],
              on_run: Callable[[list[dict]], None] = lambda runs: None) -> list[dict]:
    """Every run at every rate; `on_run(runs so far)` after each (the harness saves partial results)."""
    runs = []
    for run_config in config.runs:
        engine = None
        for i, rate in enumerate(config.request_rates):
            timed = with_rate(requests, rate, config.workload.seed)
            name = f"{run_config.name}@{rate:g}"
            build_s, build_watch = 0.0, None
            if engine is None:  # one engine, built and warmed up once per run; later rates reuse its shapes
                drop_compiled_programs()  # after freeing earlier runs' programs
                engine, build_s, build_watch = build_engine(model, run_config, timed)
            trace = warm_up_and_serve(engine, timed, name, config.warmup if i == 0 else "none", build_s=build_s,
                                      build_watch=build_watch, allow_timed_compiles=config.warmup == "none")
            runs.append({"name": name, "config": {**run_config.model_dump(), "request_rate": rate},
                         "metrics": summarize(trace)})
            on_run(runs)
    return runs


def plot_sweep(path: Path, config, runs: list[dict], title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for base in (r.name for r in config.runs):
        points = [(run["config"]["request_rate"], run["metrics"]["normalized_latency_s_per_token"])
                  for run in runs if run["config"]["name"] == base]
        ax.plot(*zip(*points), marker="o", label=base)
    ax.axhline(config.latency_bound_s_per_token, color="gray", linestyle="--", linewidth=1, label="bound")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("normalized latency (s/token)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)
