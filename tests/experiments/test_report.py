"""experiments.report and experiments.render_docs: the provenance every results.json carries, the
tables the harness prints, and the README/docs blocks rendered from results files (on a miniature
repository in a tmp dir: a changed number fails --check, a missing file is a clear error)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from experiments import provenance
from experiments.render_docs import main as render
from experiments.report import write_results
from experiments.tables import claims_table, markdown_table

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
    assert table.startswith("| run | ")
    assert table.splitlines()[-1].endswith("| 2.50x |")
    claims = claims_table([{"claim": "c", "source": "s", "paper": 1.5, "ours": 2.0, "unit": "x"}])
    assert claims.splitlines() == ["| claim | source | paper | ours | unit |", "|---|---|---|---|---|",
                                   "| c | s | 1.5 | 2 | x |"]


def _repo(tmp_path, readme: str, docs: dict[str, str] | None = None, results: dict[str, dict] | None = None):
    """A miniature repository: README.md, docs/*.md, docs/results/NAME/results.json."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / "docs" / "results").mkdir(parents=True)
    for name, text in (docs or {}).items():
        (tmp_path / "docs" / name).write_text(text)
    for name, result in (results or {}).items():
        (tmp_path / "docs" / "results" / name).mkdir()
        (tmp_path / "docs" / "results" / name / "results.json").write_text(json.dumps(result))
    return tmp_path


def _render(root, *flags) -> int:
    return render([str(root / "docs" / "results"), "--root", str(root), *flags])


def _claimed(ours: float) -> dict:
    return {**_result(), "claims": [{"claim": "speedup", "source": "Fig. 1", "paper": 2.0, "ours": ours, "unit": "x"}],
            "provenance": {"git_commit_short": "abc1234", "git_dirty": False, "date_utc": "2025-01-02T03:04:05+00:00",
                           "packages": {"jax": "0.4.0"}, "cpu_count": 8, "xla_cpu_count": 2, "cpu_model": "cpu",
                           "jax_backend": "cpu", "command": ["python", "-m", "experiments.run", "demo.yaml"]}}


def test_renders_tables_and_check_catches_a_changed_number(tmp_path, capsys):
    root = _repo(tmp_path, "# r\n\n## Results\n\n<!-- results: demo table -->\nstale\n<!-- /results -->\n"
                           "<!-- results: demo claims -->\n<!-- /results -->\n"
                           "<!-- results: demo provenance -->\n<!-- /results -->\n",
                 results={"demo": _claimed(2.5)})
    assert _render(root, "--check") == 1
    assert "-stale" in capsys.readouterr().out
    assert _render(root) == 0
    text = (root / "README.md").read_text()
    assert markdown_table(RUNS) in text and claims_table(_claimed(2.5)["claims"]) in text
    assert "Measured at commit `abc1234`, 2025-01-02 03:04 UTC, jax 0.4.0, 2 of 8 CPUs" in text
    assert "`python -m experiments.run demo.yaml`" in text
    assert _render(root, "--check") == 0
    result = _claimed(2.5)
    result["runs"][1]["metrics"]["output_tokens_per_s"] = 30.0  # a re-run moved a number
    (root / "docs" / "results" / "demo" / "results.json").write_text(json.dumps(result))
    assert _render(root, "--check") == 1
    diff = capsys.readouterr().out
    assert "-| b | 25.0 |" in diff and "+| b | 30.0 |" in diff
    assert (root / "README.md").read_text() == text  # --check writes nothing


def test_missing_results_file_is_an_error_unless_optional(tmp_path, capsys):
    root = _repo(tmp_path, "<!-- results: nothing table -->\n<!-- /results -->\n")
    assert _render(root, "--check") == 2
    err = capsys.readouterr().err
    assert "docs/results/nothing/results.json" in err and "does not exist" in err
    assert "python -m experiments.run experiments/configs/nothing.yaml --out docs/results/nothing" in err
    root = _repo(tmp_path / "opt", "<!-- results: nothing table optional -->\n<!-- /results -->\n"
                                   "<!-- results: nothing claims optional -->\n<!-- /results -->\n")
    assert _render(root) == 0 and _render(root, "--check") == 0
    assert (root / "README.md").read_text() == (
        "<!-- results: nothing table optional -->\nNo committed results yet: run `python -m experiments.run "
        "experiments/configs/nothing.yaml --out docs/results/nothing`\n<!-- /results -->\n"
        "<!-- results: nothing claims optional -->\n\n<!-- /results -->\n")


def test_summary_links_each_claim_to_its_section(tmp_path):
    root = _repo(tmp_path, "<!-- results: all summary -->\n<!-- /results -->\n",
                 docs={"tech.md": "# Tech\n\n## The demo (Fig. 1)\n\n<!-- results: demo claims -->\n<!-- /results -->\n\n"
                                  "## Later\n\n<!-- results: later table optional -->\n<!-- /results -->\n"},
                 results={"demo": _claimed(2.5)})
    assert _render(root) == 0
    readme = (root / "README.md").read_text()
    assert "| speedup | Fig. 1 | 2.0 | 2.5 | x | [demo](docs/tech.md#the-demo-fig-1) |" in readme
    assert "No committed results yet for: [later](docs/tech.md#later)." in readme


def test_sweep_and_plot_blocks(tmp_path):
    runs = [{"name": f"{base}@{rate:g}", "config": {"name": base, "request_rate": rate},
             "metrics": {"normalized_latency_s_per_token": latency}}
            for base, rate, latency in [("fast", 1.0, 0.1), ("fast", 2.0, 0.2), ("slow", 1.0, 0.5), ("slow", 2.0, 0.9)]]
    root = _repo(tmp_path, "<!-- results: sweep sweep -->\n<!-- /results -->\n"
                           "<!-- results: sweep plot latency_vs_rate.png -->\n<!-- /results -->\n",
                 results={"sweep": {"experiment": "sweep", "runs": runs, "claims": [], "latency_bound_s_per_token": 0.25}})
    (root / "docs" / "results" / "sweep" / "latency_vs_rate.png").write_bytes(b"png")
    assert _render(root) == 0
    text = (root / "README.md").read_text()
    assert "| fast | 0.100 | 0.200 | 2 |" in text and "| slow | 0.500 | 0.900 | - |" in text
    assert "<= 0.25 s/token" in text
    assert "![sweep](docs/results/sweep/latency_vs_rate.png)" in text
    (root / "docs" / "results" / "sweep" / "latency_vs_rate.png").unlink()
    assert _render(root, "--check") == 2  # an image the file set does not hold


@pytest.mark.parametrize("text, message", [
    ("<!-- results: demo chart -->\n<!-- /results -->\n", "bad marker"),
    ("<!-- results: demo table -->\nno end\n", "has no '<!-- /results -->'"),
    ("<!-- results: demo summary -->\n<!-- /results -->\n", "all summary"),
])
def test_bad_markers_are_errors(tmp_path, capsys, text, message):
    root = _repo(tmp_path, text, results={"demo": _result()})
    assert _render(root, "--check") == 2
    assert message in capsys.readouterr().err


def test_markers_inside_code_fences_are_examples(tmp_path):
    text = "```markdown\n<!-- results: missing table -->\nexample\n<!-- /results -->\n```\n"
    root = _repo(tmp_path, text)
    assert _render(root, "--check") == 0 and _render(root) == 0
    assert (root / "README.md").read_text() == text


def test_startup_block_puts_cold_beside_warm(tmp_path, capsys):
    def result(load_s, startups):
        runs = [{"name": n, "config": {}, "metrics": {"startup_s": s}} for n, s in startups.items()]
        return {**_result(), "runs": runs, "load_s": load_s}

    root = _repo(tmp_path, "<!-- results: cold startup warm -->\n<!-- /results -->\n",
                 results={"cold": result(20.0, {"hf": 5.0, "ours": 70.0}), "warm": result(4.0, {"hf": 5.0, "ours": 11.0})})
    assert _render(root) == 0
    text = (root / "README.md").read_text()
    assert "| load (model + workload) | 20.0 | 4.0 | 5.0x |" in text
    assert "| load + `hf` startup (the job's first timed request) | 25.0 | 9.0 | 2.8x |" in text
    assert "| load + `ours` startup | 90.0 | 15.0 | 6.0x |" in text
    (root / "README.md").write_text("<!-- results: cold startup -->\n<!-- /results -->\n")
    assert _render(root, "--check") == 2 and "needs ARG" in capsys.readouterr().err
