"""Experiment config: valid files load, unknown keys and bad values name the key and allowed values."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from experiments.config import ConfigError, load_config, parse_config

CONFIGS = sorted(Path("experiments/configs").glob("*.yaml"))
BASE = {"experiment": "x", "workload": {"kind": "alpaca", "num_requests": 3},
        "runs": [{"name": "a", "engine": "static"}]}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
@pytest.mark.parametrize("smoke", [False, True])
def test_shipped_configs_validate(path, smoke):
    config = load_config(path, smoke=smoke)
    assert config.experiment == path.stem


def test_defaults():
    config = parse_config(BASE)
    assert config.model == "smollm2-135m" and config.dtype == "float32"
    assert math.isinf(config.workload.request_rate)
    assert config.runs[0].batch_size == 8


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["runs"][0].update(batch_sizee=3), "runs[0].batch_sizee: unknown key; allowed keys: batch_size, engine, name"),
    (lambda d: d["workload"].update(rate=1), "workload.rate: unknown key; allowed keys: kind, max_output_len"),
    (lambda d: d.update(modle="tiny"), "modle: unknown key; allowed keys: check_same_outputs, claims, description, dtype, experiment"),
    (lambda d: d["runs"][0].update(engine="vllm"), "expected tags: 'static', 'hf'"),
    (lambda d: d["workload"].update(kind="c4"), "workload.kind: Input should be 'sharegpt', 'alpaca' or 'fixed'"),
    (lambda d: d.update(dtype="float16"), "dtype: Input should be 'float32' or 'bfloat16'"),
    (lambda d: d["workload"].update(num_requests=0), "workload.num_requests: Input should be greater than 0"),
    (lambda d: d["runs"].append({"name": "a", "engine": "hf"}), "run names must be unique; repeated: ['a']"),
    (lambda d: d.update(runs=[]), "runs: List should have at least 1 item"),
    (lambda d: d.update(claims=[{"claim": "c", "source": "s", "paper": 1, "unit": "x", "run": "b",
                                 "metric": "kv_utilization"}]), "claims[0].run: unknown run 'b'; allowed: ['a']"),
    (lambda d: d["runs"].append({"name": "m", "engine": "memory_sim", "reservation": "buddy",
                                 "kv_budget_tokens": 64}), "runs[1].reservation: Input should be 'max', 'pow2', 'oracle' or 'paged'"),
])
def test_bad_configs_name_the_key(mutate, expected):
    data = copy.deepcopy(BASE)
    mutate(data)
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert expected in str(err.value)


def test_smoke_overrides_merge_deeply():
    data = copy.deepcopy(BASE) | {"smoke": {"model": "tiny", "workload": {"num_requests": 1}}}
    full, smoke = parse_config(data), parse_config(data, smoke=True)
    assert (full.model, full.workload.num_requests) == ("smollm2-135m", 3)
    assert (smoke.model, smoke.workload.num_requests, smoke.workload.kind) == ("tiny", 1, "alpaca")


def test_unreadable_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("runs: [unclosed")
    with pytest.raises(ConfigError, match="cannot read experiment config"):
        load_config(path)


def test_fixed_workload_needs_both_lengths():
    data = copy.deepcopy(BASE)
    data["workload"] = {"kind": "fixed", "num_requests": 2, "max_prompt_len": 8}
    with pytest.raises(ConfigError, match="kind 'fixed' needs max_prompt_len and max_output_len"):
        parse_config(data)


def test_a_continuous_run_embeds_the_engine_config():
    """Every key of a continuous run but `name` and `engine` is an EngineConfig field of the same
    name and default, except the harness's documented sizes; and every EngineConfig field is a key
    but the two that are not YAML (a device mesh, and the seed of requests that are greedy here)."""
    import dataclasses

    from continuous_batching.engine_config import EngineConfig
    from experiments.config import ContinuousRunConfig
    from experiments.config_checks import ENGINE_KEYS

    fields = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    run_keys = set(ContinuousRunConfig.model_fields) - {"name", "engine"}
    assert run_keys == set(ENGINE_KEYS) == set(fields) - {"mesh", "seed"}
    differ = {key for key in run_keys if ContinuousRunConfig.model_fields[key].default != fields[key]}
    assert differ == {"num_blocks", "max_num_seqs", "max_model_len"}  # named in ContinuousRunConfig's docstring
