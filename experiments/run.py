"""`python -m experiments.run CONFIG.yaml [--out DIR] [--smoke]`: run every configured engine on
the same workload in one process, print a markdown table, write results.json/.csv and a PNG."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the lab never reaches the hub at run time


import models  # noqa: E402
from experiments.config import ConfigError, ExperimentConfig, load_config  # noqa: E402
from experiments.engines import OptionalEngineMissing, drop_compiled_programs, make_engine, warm_up_and_serve  # noqa: E402
from experiments.metrics import summarize  # noqa: E402
from experiments.report import claims_table, markdown_table, write_results  # noqa: E402
from experiments.workloads import build_workload, describe  # noqa: E402


def run_experiment(config: ExperimentConfig, out_dir: Path) -> dict:
    """Load the model once, build the workload once, run each engine on it; write and return results."""
    t0 = time.perf_counter()
    model = models.load(config.model, dtype=config.dtype, random_weights=config.random_weights)
    requests = build_workload(config.workload, tokenizer=model.tokenizer, vocab_size=model.config.vocab_size)
    print(f"model {config.model} ({model.config.num_params() / 1e6:.1f}M params, {model.dtype}) loaded "
          f"in {time.perf_counter() - t0:.1f}s; workload: {describe(requests)}", file=sys.stderr)
    if config.request_rates:
        return _run_rate_sweep(model, config, requests, out_dir)
    runs, outputs = [], {}
    for run_config in config.runs:
        drop_compiled_programs()
        try:
            engine = make_engine(model, run_config, requests)
        except OptionalEngineMissing as err:
            print(f"skipping run {run_config.name!r}: {err}", file=sys.stderr)
            continue
        trace = warm_up_and_serve(engine, requests, run_config.name, config.warmup)
        if getattr(engine, "outputs", None):
            outputs[run_config.name] = dict(engine.outputs)
        runs.append({"name": run_config.name, "config": run_config.model_dump(), "metrics": summarize(trace)})
        _save_partial(out_dir, config, runs)  # a later run that dies (e.g. out of memory) loses only itself
    result = {"experiment": config.experiment, "description": config.description, "model": config.model,
              "dtype": config.dtype, "workload": {**config.workload.model_dump(), **describe(requests)},
              "runs": runs, "claims": evaluate_claims(config, runs)}
    if config.check_same_outputs:
        result["same_outputs"] = same_outputs(outputs)
    paths = write_results(out_dir, result)
    (out_dir / "results.partial.json").unlink(missing_ok=True)
    print(markdown_table(runs))
    if config.check_same_outputs:
        print(f"\nsame tokens for every request as run {next(iter(outputs), '-')!r}: {result['same_outputs']}")
    if result["claims"]:
        print("\n" + claims_table(result["claims"]))
    print(f"\nwrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return result


def _save_partial(out_dir: Path, config: ExperimentConfig, runs: list[dict]) -> None:
    """results.partial.json: the runs finished so far (removed once results.json is written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.partial.json").write_text(json.dumps(
        {"experiment": config.experiment, "model": config.model, "runs": runs}, indent=2))


def _run_rate_sweep(model, config: ExperimentConfig, requests, out_dir: Path) -> dict:
    from experiments.sweep import plot_sweep, run_sweep, sustained_rates, sweep_table

    runs = run_sweep(model, config, requests, lambda runs: _save_partial(out_dir, config, runs))
    result = {"experiment": config.experiment, "description": config.description, "model": config.model,
              "dtype": config.dtype, "workload": {**config.workload.model_dump(), **describe(requests)},
              "runs": runs, "sustained_rate": sustained_rates(config, runs), "claims": evaluate_claims(config, runs)}
    paths = write_results(out_dir, result)
    paths.append(plot_sweep(out_dir / "latency_vs_rate.png", config, runs,
                            f"{config.experiment} - {config.model} - {config.workload.kind}"))
    (out_dir / "results.partial.json").unlink(missing_ok=True)
    print(markdown_table(runs) + "\n\n" + sweep_table(config, runs))
    if result["claims"]:
        print("\n" + claims_table(result["claims"]))
    print(f"\nwrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return result


def same_outputs(outputs: dict[str, dict[int, list[int]]]) -> dict[str, bool]:
    """Per run that recorded its tokens: whether every request got the first such run's tokens."""
    if not outputs:
        return {}
    first = next(iter(outputs.values()))
    return {name: tokens == first for name, tokens in outputs.items()}


def evaluate_claims(config: ExperimentConfig, runs: list[dict]) -> list[dict]:
    """Each configured claim with our number beside the paper's."""
    metrics = {run["name"]: run["metrics"] for run in runs}
    claims = []
    for claim in config.claims:
        if claim.run not in metrics or (claim.ratio_to is not None and claim.ratio_to not in metrics):
            print(f"claim {claim.claim!r} not evaluated: its run was skipped", file=sys.stderr)
            continue
        ours = metrics[claim.run][claim.metric]
        if claim.ratio_to is not None:
            ours = ours / metrics[claim.ratio_to][claim.metric]
        claims.append({"claim": claim.claim, "source": claim.source, "paper": claim.paper,
                       "ours": float(ours), "unit": claim.unit})
    return claims


def keep_freed_memory() -> None:
    """Tell glibc malloc to keep freed memory instead of returning it to the OS (what the env vars
    MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647 do). XLA on
    CPU allocates every step's temporaries anew; served from fresh mmaps they page-fault on every
    step, which measured 2-3x slower attention. Process-wide and opt-in (`--keep-freed-memory`): a
    vs_hf run with it on (HF torch b8, b32, then our static engine) was OOM-killed at 24 GB, most
    likely heap fragmentation with no trimming. No-op off glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: no mmap below 1 GiB
    libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: never trim the heap
    libc.mallopt(-8, 1)  # M_ARENA_MAX: one arena, so worker threads reuse it too


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__)
    parser.add_argument("config", type=Path, help="experiment YAML, e.g. experiments/configs/quickstart.yaml")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/<experiment>)")
    parser.add_argument("--smoke", action="store_true", help="apply the config's `smoke:` overrides (tiny, fast)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory: faster XLA CPU steps, more resident memory")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, smoke=args.smoke)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.keep_freed_memory:
        keep_freed_memory()
    out_dir = args.out or Path("results") / (config.experiment + ("-smoke" if args.smoke else ""))
    run_experiment(config, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
