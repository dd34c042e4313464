"""The KV-memory simulation (vLLM Fig. 2 / 13) on hand-checkable scenarios."""

from __future__ import annotations

import pytest

import models
from experiments.config import MemorySimRunConfig
from experiments.memory_sim import MemorySimEngine, reservation
from experiments.metrics import summarize
from experiments.workloads import Request


def run(policy: str, requests, budget: int, **kwargs):
    config = MemorySimRunConfig(name=policy, engine="memory_sim", reservation=policy,
                                kv_budget_tokens=budget, **kwargs)
    engine = MemorySimEngine(models.load("tiny"), config, requests)
    done = []
    trace = engine.serve(requests, done.append)
    assert sum(done) == len(requests) == len(trace.records)  # nobody lost, even after preemption
    return trace, summarize(trace)


def test_reservations():
    assert reservation("max", 10, 5, 64) == 64
    assert reservation("pow2", 10, 5, 64) == 10 + 8
    assert reservation("pow2", 10, 8, 64) == 10 + 8
    assert reservation("oracle", 10, 5, 64) == 15
    with pytest.raises(ValueError, match="allowed: 'max', 'pow2', 'oracle', 'paged'"):
        reservation("buddy", 1, 1, 8)


def test_oracle_by_hand():
    """Budget 20, two requests (prompt 4, output 6) reserve 10 each and run together for 6 iterations;
    the third waits. Held after iteration i (0-based) per request: 4 + i."""
    requests = [Request(i, (1,) * 4, 6, 0.0) for i in range(3)]
    trace, m = run("oracle", requests, budget=20)
    assert m["iterations"] == 12 and m["saturated_iterations"] == 6
    assert m["mean_batched_requests"] == 2 and m["max_concurrent_requests"] == 2
    assert m["kv_utilization"] == pytest.approx(sum(2 * (4 + i) for i in range(6)) / 6 / 20)
    assert sorted(r.finish_s for r in trace.records) == [6, 6, 12]


def test_max_reservation_batches_budget_over_max_len():
    requests = [Request(i, (1,) * 3, 2, 0.0) for i in range(10)]
    _, m = run("max", requests, budget=64, max_len=16)
    assert m["mean_batched_requests"] == 4  # 64 // 16


def test_paged_packs_more_and_preempts_without_losing_requests():
    requests = [Request(i, (1,) * (5 + i % 7), 20 + 3 * (i % 5), 0.0) for i in range(40)]
    _, paged = run("paged", requests, budget=128, block_size=4, watermark=0.0)
    _, oracle = run("oracle", requests, budget=128)
    assert paged["mean_batched_requests"] > oracle["mean_batched_requests"]
    assert paged["kv_utilization"] > oracle["kv_utilization"]
    assert paged["kv_utilization"] <= 1.0
    assert paged["preemptions"] > 0  # blocks ran out mid-generation at least once


def test_requests_longer_than_max_len_are_rejected():
    with pytest.raises(ValueError, match="exceed max_len=8"):
        run("max", [Request(0, (1,) * 6, 4, 0.0)], budget=64, max_len=8)
