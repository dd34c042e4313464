"""The KV-memory simulation (vLLM Fig. 2 / 13) on hand-checkable scenarios."""

from __future__ import annotations

import pytest

import models
from experiments.config import MemorySimRunConfig
from experiments.trace import kv_bytes_per_token
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


def test_paged_recompute_by_hand():
    """Blocks of 4, budget 4 blocks, no watermark. A (prompt 4) and B (prompt 2), 6 tokens each.
    Iteration 0: both prompt passes (1 block each), 2 free. A takes a block at iteration 1 (its 5th
    token), B at 3 (its 3rd): 0 free. At iteration 5, A needs a block for its 9th token: B (newest) is
    preempted with 5 tokens generated, its 2 blocks freed; A takes one. B's resumption needs prompt 2
    + 5 generated + 1 slot = 8 tokens = 2 blocks, only 1 is free, so B waits (the one saturated
    iteration: A alone, holding 4 + 5). A finishes at 6; at iteration 6 B's prompt pass recomputes its
    7 tokens and samples its 6th and last: 7 iterations in all, B ran 6 of them (= its output), not 5
    + 6 as a restart from zero would."""
    requests = [Request(0, (1,) * 4, 6, 0.0), Request(1, (1,) * 2, 6, 0.0)]
    trace, m = run("paged", requests, budget=16, block_size=4, watermark=0.0)
    assert m["iterations"] == 7 and m["preemptions"] == 1 and m["recomputed_tokens"] == 7
    assert m["saturated_iterations"] == 1 and m["mean_batched_requests"] == 1
    assert m["kv_utilization"] == pytest.approx((4 + 5) / 16)
    by_id = {r.request_id: r for r in trace.records}
    assert (by_id[0].first_token_s, by_id[0].finish_s) == (1, 6)
    assert (by_id[1].first_token_s, by_id[1].finish_s) == (1, 7)  # first token: its first ever
    assert trace.generated_tokens == m["output_tokens_per_iteration"] * 7 == 12  # nothing sampled twice
    assert trace.kv_bytes_used_peak == (4 + 4 + 2 + 4) * kv_bytes_per_token(models.load("tiny"))  # iteration 4


def test_paged_recompute_samples_each_output_token_once():
    requests = [Request(i, (1,) * (5 + i % 7), 20 + 3 * (i % 5), 0.0) for i in range(40)]
    trace, m = run("paged", requests, budget=128, block_size=4, watermark=0.0)
    assert m["preemptions"] > 0 and m["recomputed_tokens"] > 0
    assert trace.generated_tokens == sum(r.output_len for r in requests)
    # each request ran exactly output_len iterations, so it spans at least that many
    assert all(r.finish_s - r.first_token_s >= r.output_len - 1 for r in trace.records)
    assert m["iterations"] >= max(r.output_len for r in requests)


@pytest.mark.parametrize("policy, budget, smallest", [
    ("max", 63, 64), ("pow2", 25, 10 + 16), ("oracle", 18, 10 + 9),
    # paged: resumed after its 8th token, request 1 needs 10 + 8 + 1 slots = 5 blocks of 4 above the
    # watermark (0.2 of the blocks): 5 blocks leave 4, 6 leave 5. Budget 20 admits its prompt + 1
    # (3 blocks) but could not take it back after a late preemption.
    ("paged", 20, 24)])
def test_budget_below_one_request_is_rejected(policy, budget, smallest):
    requests = [Request(0, (1,) * 2, 3, 0.0), Request(1, (1,) * 10, 9, 0.0)]
    with pytest.raises(ValueError, match=f"kv_budget_tokens={budget} .* smallest budget that would work is {smallest}$"):
        run(policy, requests, budget=budget, max_len=64, block_size=4, watermark=0.2)
    run(policy, requests, budget=smallest, max_len=64, block_size=4, watermark=0.2)  # and that one works


def test_requests_longer_than_max_len_are_rejected():
    with pytest.raises(ValueError, match="exceed max_len=8"):
        run("max", [Request(0, (1,) * 6, 4, 0.0)], budget=64, max_len=8)
