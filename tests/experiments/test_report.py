"""experiments.report: the provenance every results.json carries, and the tables it renders."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

from experiments import provenance
from experiments.report import claims_table, markdown_table, write_results

RUNS = [{"name": "a", "config": {"engine": "static"},
         "metrics": {"output_tokens_per_s": 10.0, "requests_per_s": 1.0, "kv_utilization": 0.5}},
        {"name": "b", "config": {"engine": "static"},
         "metrics": {"output_tokens_per_s": 25.0, "requests_per_s": 2.0, "kv_utilization": 0.9}}]


def _result() -> dict:
    return {"experiment": "demo", "model": "tiny", "workload": {"kind": "alpaca", "num_requests": 2},
            "runs": [dict(r) for r in RUNS], "claims": []}


def test_write_results_adds_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(provenance._REPO / "experiments" / "run.py"), "x.yaml", "--out", "d"])
    monkeypatch.setattr(provenance, "_jax_devices", lambda: ("cpu", ["cpu:cpu"]))  # keep the test off jax
    monkeypatch.setattr("experiments.report.plot_runs", lambda path, result: path)
    write_results(tmp_path, _result())
    prov = json.loads((tmp_path / "results.json").read_text())["provenance"]
    assert set(prov) == {"git_commit", "git_commit_short", "git_dirty", "date_utc", "command", "python",
                         "packages", "cpu_count", "xla_cpu_count", "cpu_model", "jax_backend",
                         "jax_devices", "xla_flags", "platform"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=provenance._REPO, capture_output=True, text=True)
    if head.returncode == 0:  # the tests run from a git checkout
        assert prov["git_commit"] == head.stdout.strip() and prov["git_commit_short"] == head.stdout.strip()[:7]
        assert isinstance(prov["git_dirty"], bool)
    assert prov["command"] == ["python", "-m", "experiments.run", "x.yaml", "--out", "d"]
    assert prov["python"] == platform.python_version()
    assert set(prov["packages"]) == {"jax", "jaxlib", "transformers", "torch"}
    assert prov["packages"]["jax"]  # installed here
    assert prov["cpu_count"] >= 1 and 1 <= prov["xla_cpu_count"] <= prov["cpu_count"]
    assert prov["date_utc"].endswith("+00:00")


def test_existing_provenance_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("experiments.report.plot_runs", lambda path, result: path)
    result = {**_result(), "provenance": {"git_commit": "abc"}}
    write_results(tmp_path, result)
    assert json.loads((tmp_path / "results.json").read_text())["provenance"] == {"git_commit": "abc"}


def test_provenance_outside_a_git_tree_is_null(monkeypatch):
    monkeypatch.setattr(provenance, "_git", lambda *args: None)
    monkeypatch.setattr(provenance, "_jax_devices", lambda: (None, []))
    prov = provenance.collect_provenance()
    assert prov["git_commit"] is None and prov["git_commit_short"] is None and prov["git_dirty"] is None


def test_command_keeps_a_plain_argv(monkeypatch):
    assert provenance._command(["pytest", "-q"]) == ["pytest", "-q"]
    assert provenance._command([]) == []


def test_tables_keep_their_shape():
    table = markdown_table(RUNS)
    assert table.startswith("| run | output tok/s | req/s |")
    assert table.splitlines()[-1].endswith("| 2.50x |")
    claims = claims_table([{"claim": "c", "source": "s", "paper": 1.5, "ours": 2.0, "unit": "x"}])
    assert claims.splitlines() == ["| claim | source | paper | ours | unit |", "|---|---|---|---|---|",
                                   "| c | s | 1.5 | 2 | x |"]
