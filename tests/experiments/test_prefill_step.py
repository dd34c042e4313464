"""The prefill-step benchmark's workload: one long prompt, then ShareGPT-like ones within the budget."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.prefill_step import LONGEST, step_prompts


@pytest.mark.parametrize("budget", [256, 512, 2048])
def test_a_step_fills_its_budget_behind_one_long_prompt(budget):
    lengths = step_prompts(budget, np.random.default_rng(budget))
    assert lengths[0] == min(LONGEST, budget // 2) and sum(lengths) <= budget
    assert all(4 <= n <= 966 for n in lengths[1:])
    if budget == 2048:
        assert len(lengths) > 5  # many short prompts next to the long one: what padding punishes
