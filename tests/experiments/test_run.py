"""The harness end to end on the smoke size of every shipped config (tiny model, seconds)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.config import load_config
from experiments.run import devices_needed, main

CONFIGS = sorted(Path("experiments/configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_smoke_run_writes_results(path, tmp_path, capsys):
    if devices_needed(load_config(path, smoke=True)) > 1:  # jax started with one CPU device here: a process
        done = subprocess.run([sys.executable, "-m", "experiments.run", str(path), "--smoke", "--out", str(tmp_path)],
                              capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert done.returncode == 0, done.stderr[-3000:]
        table = done.stdout
    else:
        assert main([str(path), "--smoke", "--out", str(tmp_path)]) == 0
        table = capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result) >= {"experiment", "model", "workload", "runs", "claims"}
    assert result["experiment"] == path.stem
    for run in result["runs"]:
        m = run["metrics"]
        assert set(run) >= {"name", "config", "metrics"}
        if run["config"]["engine"] == "attention_bench":
            assert m["attention_us_per_call"] > 0 and m["kv_gb_per_s"] > 0 and m["kv_bytes_allocated_peak"] > 0
            continue
        if run["config"]["engine"] == "fusion_bench":
            assert m["num_tokens"] > 0 and m["layer_max_abs_diff"] < 1e-4
            assert (m["layer_us"] is None) == (run["config"]["kernels"] == "pallas")  # interpreted: not timed
            continue
        if run["config"]["engine"] == "quant_eval":
            assert m["perplexity"] > 1 and 0 < m["bits_per_weight"] <= 32 and 0 <= m["top1_agreement"] <= 1
            block_format = run["config"]["quantization"].startswith("Q")
            assert (m["decode_b1_tokens_per_s"] is None) == block_format == (m["block_formats_used"] is not None)
            assert (m["decode_b64_speedup"] is None) == block_format
            assert block_format or m["decode_b64_speedup"] > 0  # ours over the base, timed alternately
            continue
        if run["config"]["engine"] == "parallel_eval":
            assert m["param_bytes_per_device"] > 0 and m["logit_max_abs_gap"] < 1e-4 and m["prefill_ms"] > 0
            tensor_parallel = run["config"]["tp"] > 1 and run["config"]["pp"] == 1
            assert (m["allreduce_bytes_per_decode_step"] or 0) > 0 if tensor_parallel else not m[
                "allreduce_bytes_per_decode_step"]
            continue
        if run["config"]["engine"] == "parallel_projection":
            assert m["tp"] * m["pp"] >= 1 and m["weights_gib_per_device"] > 0
            continue
        if run["config"]["engine"] == "gemm_roofline":
            assert m["gemm_gflops"] > 0 and m["decode_tokens_per_s"] == pytest.approx(
                m["gemm_gflops"] * 1e9 / m["flops_per_token"])
            continue
        if run["config"]["engine"] == "continuous":
            assert m["decode_tokens_per_s"] > 0
        assert 0 < m["kv_utilization"] <= 1
        assert 0 < m["kv_bytes_used_peak"] <= m["kv_bytes_allocated_peak"]
        if run["config"]["engine"] == "memory_sim":
            assert m["mean_batched_requests"] > 0 and m["output_tokens_per_iteration"] > 0
            continue
        if run["config"]["engine"] == "sharing_sim":
            assert 0 < m["memory_saved_fraction"] <= 1
            assert m["blocks_with_sharing_mean"] < m["blocks_without_sharing_mean"]
            continue
        assert m["output_tokens_per_s"] > 0 and m["requests_per_s"] > 0
        assert m["latency_p50_s"] <= m["latency_p99_s"]
        assert m["output_tokens"] == pytest.approx(result["workload"]["mean_output_len"] * result["workload"]["num_requests"])
        assert m["generated_tokens"] >= m["output_tokens"]
        assert 0 < m["prefill_time_fraction"] < 1
    for claim in result["claims"]:
        assert set(claim) == {"claim", "source", "paper", "ours", "unit"} and claim["ours"] >= 0
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [r["name"] for r in result["runs"]]
    assert (tmp_path / "throughput_latency.png").stat().st_size > 10_000
    assert table.startswith("| run | ")
    assert all(f"| {r['name']} |" in table for r in result["runs"])
    assert ("| claim | source | paper | ours | unit |" in table) == bool(result["claims"])


def test_static_engine_outputs_exact_lengths_and_counts_waste(tmp_path):
    """Static batching: every request gets exactly its output length; the batch pays for the longest."""
    import models
    from experiments.config import StaticRunConfig
    from experiments.engines import make_engine, warm_up_and_serve
    from experiments.workloads import Request
    from models.static_batch import prompt_bucket
    from paged_attention.buckets import round_up

    model = models.load("tiny")
    requests = [Request(0, (5, 6, 7), 3, 0.0), Request(1, (8,) * 20, 9, 0.0), Request(2, (9, 9), 1, 0.0)]
    engine = make_engine(model, StaticRunConfig(name="s", engine="static", batch_size=4), requests)
    trace = warm_up_and_serve(engine, requests, "s", warmup="untimed_pass")  # raises if the timed part compiled
    assert len(trace.records) == 3 and sorted(engine.outputs) == [0, 1, 2]
    assert [len(engine.outputs[i]) for i in range(3)] == [3, 9, 1]
    assert trace.generated_tokens == 4 * 9  # 4 padded rows x the longest output
    assert trace.num_compilations == 0 and trace.startup_compilations > 0
    per_token = model.config.kv_bytes_per_token(4)
    max_len = round_up(prompt_bucket(20) + 9, 64)  # FT sizes the cache per batch: longest prompt + output
    assert trace.kv_bytes_used_peak == (3 + 3 + 20 + 9 + 2 + 1) * per_token
    assert trace.kv_bytes_allocated_peak == 4 * max_len * per_token
    # steps 0..8 (prefill + 8 decodes): rows grow until their own output length, then stay
    held = [sum(p + min(s + 1, o) for p, o in [(3, 3), (20, 9), (2, 1)]) for s in range(9)]
    assert trace.kv_utilization == pytest.approx(sum(held) / 9 / (4 * max_len))


def test_unknown_key_exits_2_and_names_it(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("experiment: bad\nworkload: {kind: alpaca, num_requests: 2}\n"
                    "runs: [{name: a, engine: static, batchsize: 4}]\n")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "runs[0].batchsize: unknown key; allowed keys: batch_size, engine, name" in err


def test_finished_runs_survive_a_later_run_that_dies(tmp_path, monkeypatch):
    import experiments.run as run_module
    from experiments.config import parse_config

    config = parse_config({"experiment": "dies", "model": "tiny",
                           "workload": {"kind": "alpaca", "num_requests": 2, "max_output_len": 3},
                           "runs": [{"name": "first", "engine": "static"}, {"name": "second", "engine": "static"}]})
    import experiments.engines as engines_module

    real_make_engine, calls = engines_module.make_engine, []

    def make_engine(model, run_config, requests):
        calls.append(run_config.name)
        if run_config.name == "second":
            raise MemoryError("killed")
        return real_make_engine(model, run_config, requests)

    monkeypatch.setattr(engines_module, "make_engine", make_engine)
    with pytest.raises(MemoryError):
        run_module.run_experiment(config, tmp_path)
    partial = json.loads((tmp_path / "results.partial.json").read_text())
    assert calls == ["first", "second"] and [r["name"] for r in partial["runs"]] == ["first"]
    assert partial["runs"][0]["metrics"]["output_tokens_per_s"] > 0
    monkeypatch.setattr(engines_module, "make_engine", real_make_engine)
    run_module.run_experiment(config, tmp_path)
    assert not (tmp_path / "results.partial.json").exists() and (tmp_path / "results.json").exists()


def test_token_agreement_counts_requests_against_our_first_engine():
    from experiments.run import token_agreement

    outputs = {"hf": {0: [1, 2], 1: [3, 9]}, "static": {0: [1, 2], 1: [3, 4]}, "paged": {0: [1, 2], 1: [3, 5]}}
    agreement = token_agreement(outputs, informational={"hf"})
    assert {a["reference"] for a in agreement.values()} == {"static"}  # HF is never the reference
    assert [(n, a["same_requests"], a["informational"]) for n, a in agreement.items()] == [
        ("hf", 1, True), ("static", 2, False), ("paged", 1, False)]
    assert agreement["paged"]["same_tokens_fraction"] == 0.5
    assert token_agreement({"static": {0: [1]}}, set()) == {}  # nothing to compare with


def _two_static_runs(check: bool) -> dict:
    return {"experiment": "same", "model": "tiny", "check_same_outputs": check,
            "workload": {"kind": "alpaca", "num_requests": 3, "max_output_len": 3},
            "runs": [{"name": "b2", "engine": "static", "batch_size": 2},
                     {"name": "b4", "engine": "static", "batch_size": 4}]}


@pytest.mark.parametrize("check", [True, False])
def test_check_same_outputs_fails_the_command_on_a_mismatch(tmp_path, monkeypatch, capsys, check):
    import yaml

    from experiments.static_engine import StaticEngine

    real_serve = StaticEngine.serve

    def serve_with_a_wrong_token(self, requests, progress):
        trace = real_serve(self, requests, progress)
        if self.batch_size == 4 and 0 in self.outputs:
            self.outputs[0] = [t + 1 for t in self.outputs[0]]
        return trace

    monkeypatch.setattr(StaticEngine, "serve", serve_with_a_wrong_token)
    path = tmp_path / "same.yaml"
    path.write_text(yaml.safe_dump(_two_static_runs(check)))
    assert main([str(path), "--out", str(tmp_path)]) == (1 if check else 0)
    captured = capsys.readouterr()
    assert "- `b4`: 2/3 requests with the same tokens as `b2`" in captured.out
    assert ("check_same_outputs: runs ['b4']" in captured.err) == check
    result = json.loads((tmp_path / "results.json").read_text())  # written before the check fails
    assert result["token_agreement"]["b4"]["same_requests"] == 2
