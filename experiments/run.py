"""`python -m experiments.run CONFIG.yaml [--out DIR] [--smoke]`: run every configured engine on
the same workload in one process, print a markdown table, write results.json/.csv and a PNG.

Every engine gets the same startup (built, then the config's `warmup`: one untimed pass over the
workload, or a precompile of every program it reaches) and its timed run must compile nothing. Runs that record their tokens are compared with the first of our own
engines that does: the share of requests with identical tokens is reported per run, and with
`check_same_outputs: true` a mismatch among our engines fails the command (other frameworks, HF
and llama.cpp, are compared for information only)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the lab never reaches the hub at run time


import models  # noqa: E402
from distributed.mesh import request_cpu_devices  # noqa: E402
from experiments.config import ConfigError, ExperimentConfig, check_against_model, load_config  # noqa: E402
from experiments.model_source import read_model_config  # noqa: E402
from experiments.compile_watch import CompiledWhileTimed  # noqa: E402
from experiments.compile_cache import default_cache_dir, enable_compilation_cache  # noqa: E402
from experiments.engines import build_engine, drop_compiled_programs, warm_up_and_serve  # noqa: E402
from experiments.trace import OptionalEngineMissing  # noqa: E402
from experiments.metrics import summarize  # noqa: E402
from experiments.report import write_results  # noqa: E402
from experiments.tables import agreement_lines, claims_table, markdown_table  # noqa: E402
from experiments.workloads import build_workload, describe  # noqa: E402


def run_experiment(config: ExperimentConfig, out_dir: Path) -> dict:
    """Load the model once, build the workload once, run each engine on it; write and return results."""
    t0 = time.perf_counter()
    model = models.load(config.model, dtype=config.dtype, random_weights=config.random_weights)
    requests = build_workload(config.workload, tokenizer=model.tokenizer, vocab_size=model.config.vocab_size)
    load_s = time.perf_counter() - t0  # model and workload: before any engine's startup
    print(f"model {config.model} ({model.config.num_params() / 1e6:.1f}M params, {model.dtype}) loaded "
          f"in {time.perf_counter() - t0:.1f}s; workload: {describe(requests)}", file=sys.stderr)
    if config.request_rates:
        return _run_rate_sweep(model, config, requests, out_dir)
    runs, outputs, informational = [], {}, set()
    for run_config in config.runs:
        drop_compiled_programs()
        try:
            engine, build_s, build_watch = build_engine(model, run_config, requests)
        except OptionalEngineMissing as err:
            print(f"skipping run {run_config.name!r}: {err}", file=sys.stderr)
            continue
        trace = warm_up_and_serve(engine, requests, run_config.name, config.warmup, build_s=build_s,
                                  build_watch=build_watch)
        if getattr(engine, "outputs", None):
            outputs[run_config.name] = dict(engine.outputs)
            if getattr(engine, "informational_outputs", False):
                informational.add(run_config.name)
        runs.append({"name": run_config.name, "config": run_config.model_dump(), "metrics": summarize(trace)})
        _save_partial(out_dir, config, runs)  # a later run that dies (e.g. out of memory) loses only itself
    agreement = token_agreement(outputs, informational)
    for run in runs:
        if run["name"] in agreement:
            run["metrics"]["same_tokens_fraction"] = agreement[run["name"]]["same_tokens_fraction"]
    result = {"experiment": config.experiment, "description": config.description, "model": config.model,
              "dtype": config.dtype, "workload": {**config.workload.model_dump(), **describe(requests)},
              "runs": runs, "claims": evaluate_claims(config, runs), "token_agreement": agreement,
              "load_s": load_s}
    paths = write_results(out_dir, result)
    (out_dir / "results.partial.json").unlink(missing_ok=True)
    print(markdown_table(runs))
    if agreement:
        print("\n" + agreement_lines(agreement))
    if result["claims"]:
        print("\n" + claims_table(result["claims"]))
    print(f"\nwrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    differing = [name for name, a in agreement.items() if not a["informational"] and a["same_requests"] < a["num_requests"]]
    if config.check_same_outputs and differing:
        raise OutputsDiffer(f"check_same_outputs: runs {differing} gave some requests other tokens than run "
                            f"{next(iter(agreement.values()))['reference']!r} (see token_agreement in results.json)")
    return result


class OutputsDiffer(RuntimeError):
    """`check_same_outputs: true` and one of our engines gave a request different tokens."""


def _save_partial(out_dir: Path, config: ExperimentConfig, runs: list[dict]) -> None:
    """results.partial.json: the runs finished so far (removed once results.json is written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.partial.json").write_text(json.dumps(
        {"experiment": config.experiment, "model": config.model, "runs": runs}, indent=2))


def _run_rate_sweep(model, config: ExperimentConfig, requests, out_dir: Path) -> dict:
    from experiments.sweep import plot_sweep, run_sweep
    from experiments.tables import sustained_rates, sweep_table

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


def token_agreement(outputs: dict[str, dict[int, list[int]]], informational: set[str]) -> dict[str, dict]:
    """Per run that recorded its tokens: how many requests got exactly the tokens of the reference
    run (the first of our own engines that recorded them; the first run if only other frameworks
    did). Nothing to compare (fewer than two such runs): {}."""
    if len(outputs) < 2:
        return {}
    reference = next((name for name in outputs if name not in informational), next(iter(outputs)))
    expected = outputs[reference]
    agreement = {}
    for name, tokens in outputs.items():
        same = sum(tokens.get(request_id) == want for request_id, want in expected.items())
        agreement[name] = {"reference": reference, "same_requests": same, "num_requests": len(expected),
                           "same_tokens_fraction": same / max(1, len(expected)),
                           "informational": name in informational}
    return agreement


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


def devices_needed(config: ExperimentConfig) -> int:
    """The most devices one of the config's runs spreads over (tp x pp; 1 for the others)."""
    return max(getattr(run, "tp", 1) * getattr(run, "pp", 1) for run in config.runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__)
    parser.add_argument("config", type=Path, help="experiment YAML, e.g. experiments/configs/quickstart.yaml")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/<experiment>)")
    parser.add_argument("--smoke", action="store_true", help="apply the config's `smoke:` overrides (tiny, fast)")
    parser.add_argument("--compilation-cache", default=None, metavar="DIR|off",
                        help="jax's persistent compilation cache folder, or 'off' (default: "
                             "$INFER_LAB_COMPILATION_CACHE, else ~/.cache/infer-lab/jax)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory: faster XLA CPU steps, more resident memory")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, smoke=args.smoke)
        check_against_model(config, read_model_config(config.model), source=str(args.config))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    request_cpu_devices(devices_needed(config))
    if args.keep_freed_memory:
        keep_freed_memory()
    cache = args.compilation_cache
    enable_compilation_cache(default_cache_dir() if cache is None else None if cache == "off" else Path(cache))
    out_dir = args.out or Path("results") / (config.experiment + ("-smoke" if args.smoke else ""))
    try:
        run_experiment(config, out_dir)
    except (OutputsDiffer, CompiledWhileTimed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
