"""Time one prefill step of the paged model runner on ShareGPT-like prompts:
`python -m experiments.prefill_step [--budget 512 2048] [--backend paged_cpu paged_reference]`.

Each step packs whole prompts, drawn from the ShareGPT prompt-length shape (gamma, mean ~110 tokens,
capped at 966: vs_hf.yaml's longest), until the next one would pass the token budget; the first
prompt of each step is a long one (900 tokens, or half the budget if smaller), as in a step that admits
a long prompt next to short ones. Seeded random SmolLM2-135M weights; pages scattered over the pool.
Prints ms per step and prompt tokens/s per budget and backend: `paged_cpu` runs the packed query-tile
prefill (`paged_attention/prefill_cpu.py`), `paged_reference` the jnp reference, which pads every
prompt to the step's longest.
"""

from __future__ import annotations

import argparse

import numpy as np

from continuous_batching.request import Sequence
from experiments.decode_step import random_model, scattered_runner, time_steps
from experiments.run import keep_freed_memory

LONGEST = 900


def step_prompts(budget: int, rng) -> list[int]:
    """Prompt lengths of one step: a long one, then ShareGPT-like ones while they fit the budget."""
    lengths = [min(LONGEST, budget // 2)]
    while True:
        n = int(min(966, max(4, rng.gamma(1.0, 110))))
        if sum(lengths) + n > budget:
            return lengths
        lengths.append(n)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.prefill_step", description=__doc__)
    parser.add_argument("--budget", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--backend", nargs="+", default=["paged_cpu", "paged_reference"],
                        choices=["paged_cpu", "paged_reference"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    keep_freed_memory()
    model = random_model()
    print("| budget | prompts | tokens | backend | ms / step | prompt tok/s | compile + first step s |")
    print("|---|---|---|---|---|---|---|")
    for budget in args.budget:
        rng = np.random.default_rng(budget)
        lengths = step_prompts(budget, rng)
        for backend in args.backend:
            runner, tables = scattered_runner(model, lengths, rng, backend)
            prompts = [rng.integers(3, 40000, n).tolist() for n in lengths]
            seqs = [Sequence.in_cache(t, n, p) for t, n, p in zip(tables, lengths, prompts)]
            ms, first = time_steps(runner, seqs, args.repeats)
            print(f"| {budget} | {len(lengths)} | {sum(lengths)} | {backend} | {ms:.0f} | "
                  f"{sum(lengths) / ms * 1e3:.0f} | {first:.1f} |", flush=True)


if __name__ == "__main__":
    main()
