"""Workloads: ShareGPT parsing (truncated file), sampling filters, synthetic lengths, arrivals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.config import WorkloadConfig
from experiments.datasets import iter_json_array, lee_background_text, sharegpt_pairs
from experiments.workloads import ALPACA_MEAN_OUTPUT, ALPACA_MEAN_PROMPT, arrival_times, build_workload


def test_iter_json_array_stops_at_truncated_tail(tmp_path):
    records = [{"id": i, "text": "x" * (i * 1000)} for i in range(20)]
    full = json.dumps(records)
    path = tmp_path / "cut.json"
    path.write_text(full[: len(full) - 500])  # cut inside the last record
    got = list(iter_json_array(path, chunk_chars=777))  # chunks smaller than a record
    assert got == records[:-1]
    path.write_text(full)
    assert list(iter_json_array(path, chunk_chars=777)) == records
    path.write_text("\n " + json.dumps(records, indent=2) + "\n")  # whitespace around records and commas
    assert list(iter_json_array(path, chunk_chars=777)) == records
    path.write_text("  [ ]")
    assert list(iter_json_array(path)) == []


def test_sharegpt_pairs_are_cached_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("INFER_LAB_DATASET_CACHE", str(tmp_path))
    sharegpt_pairs.cache_clear()
    try:
        parsed = sharegpt_pairs()
        [cached] = tmp_path.glob("sharegpt_pairs-*.json")
        sharegpt_pairs.cache_clear()
        monkeypatch.setattr("experiments.datasets.iter_json_array", None)  # parsing again would fail
        assert sharegpt_pairs() == parsed
        assert list(tmp_path.iterdir()) == [cached]  # no partial file left behind
    finally:
        sharegpt_pairs.cache_clear()


def test_sharegpt_file_parses():
    pairs = sharegpt_pairs()
    assert len(pairs) > 11_000  # 11,135 human->gpt pairs among 17,671 complete conversations
    assert all(isinstance(p, str) and isinstance(a, str) for p, a in pairs[:100])


def test_lee_text():
    text = lee_background_text()
    assert len(text) > 300_000 and "Australia" in text


def test_alpaca_workload_lengths_and_seed():
    config = WorkloadConfig(kind="alpaca", num_requests=4000, seed=1)
    requests = build_workload(config, vocab_size=49152)
    prompts = np.array([len(r.prompt) for r in requests])
    outputs = np.array([r.output_len for r in requests])
    assert abs(prompts.mean() - ALPACA_MEAN_PROMPT) < 1.0
    assert abs(outputs.mean() - ALPACA_MEAN_OUTPUT) < 2.5
    assert all(r.arrival_s == 0.0 for r in requests)
    assert build_workload(config, vocab_size=49152) == requests  # reproducible
    assert build_workload(config.model_copy(update={"seed": 2}), vocab_size=49152) != requests


def test_caps_apply():
    config = WorkloadConfig(kind="alpaca", num_requests=500, max_prompt_len=10, max_output_len=20)
    requests = build_workload(config, vocab_size=300)
    assert max(len(r.prompt) for r in requests) == 10
    assert max(r.output_len for r in requests) == 20
    assert all(100 <= t < 300 for r in requests for t in r.prompt)


def test_poisson_arrivals_have_the_rate():
    times = arrival_times(20_000, rate=4.0, rng=np.random.default_rng(0))
    gaps = np.diff(times)
    assert np.all(gaps >= 0)
    assert abs(gaps.mean() - 0.25) < 0.01
    assert abs(gaps.std() - 0.25) < 0.01  # exponential: std == mean


def test_sharegpt_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs a model with a tokenizer"):
        build_workload(WorkloadConfig(kind="sharegpt", num_requests=2), vocab_size=100)


def test_sharegpt_workload_with_real_tokenizer(smollm2):
    config = WorkloadConfig(kind="sharegpt", num_requests=40, seed=0, max_prompt_len=300, max_output_len=128)
    requests = build_workload(config, tokenizer=smollm2.tokenizer, vocab_size=smollm2.config.vocab_size)
    assert len(requests) == 40
    assert all(4 <= len(r.prompt) <= 300 and 4 <= r.output_len <= 128 for r in requests)
    assert len({r.prompt for r in requests}) == 40  # sampled without replacement
    text = smollm2.tokenizer.decode(list(requests[0].prompt))
    assert len(text.split()) >= 2  # real text, not random ids
