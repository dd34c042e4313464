"""The naive static-batch generator (models/static_batch.py) and `models.generate`."""

from __future__ import annotations

import pytest

import models
from models import static_batch as gen
from models.sampling import SamplingConfig

SAMPLED = dict(temperature=0.8, top_k=20, top_p=0.9, seed=3)
LENGTHS = [5, 13, 1, 8]  # batch bucket 4, prompt bucket 16, 64 cache slots (as in test_llama_vs_hf)


@pytest.fixture
def prompts(tiny_model, rng) -> list[list[int]]:
    return [rng.integers(3, tiny_model.config.vocab_size, size=n).tolist() for n in LENGTHS]


# Each new (batch bucket, sampling kind, config) compiles two programs (~2.5 s on 2 CPU cores),
# so the tests below reuse a few shapes: batch buckets 4, 2 and 1, prompt bucket 16, 64 slots.
@pytest.mark.parametrize("kwargs", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_outputs_do_not_depend_on_batch_size(tiny_model, prompts, kwargs):
    whole = models.generate(tiny_model, prompts, max_new_tokens=10, ignore_eos=True, **kwargs)
    assert [len(o) for o in whole] == [10] * len(prompts)
    # batches of 2 + 2 put rows 2 and 3 in other slots; batch 1 is covered by test_per_row_max_new_tokens
    assert models.generate(tiny_model, prompts, max_new_tokens=10, ignore_eos=True, batch_size=2,
                           **kwargs) == whole


def test_seeds_give_different_samples(tiny_model, prompts):
    a = models.generate(tiny_model, prompts, max_new_tokens=10, ignore_eos=True, **SAMPLED)
    b = models.generate(tiny_model, prompts, max_new_tokens=10, ignore_eos=True, **{**SAMPLED, "seed": 4})
    greedy = models.generate(tiny_model, prompts, max_new_tokens=10, ignore_eos=True)
    assert a != b and a != greedy
    assert models.generate(tiny_model, prompts, max_new_tokens=10, ignore_eos=True, **SAMPLED) == a


def test_eos_stops_row_and_is_included(tiny_model, prompts):
    free = models.generate(tiny_model, prompts, max_new_tokens=8, ignore_eos=True)
    row = next(i for i, out in enumerate(free) if out[3] not in out[:3])  # a token first seen at step 3
    eos = free[row][3]
    eos_model = models.Model(tiny_model.config.replace(eos_token_ids=(eos,)), tiny_model.params)
    stopped = models.generate(eos_model, prompts, max_new_tokens=8)
    assert stopped[row] == free[row][:4]
    for out, full in zip(stopped, free):  # every row stops at its first EOS, if any
        assert out == (full[:full.index(eos) + 1] if eos in full else full)
    assert models.generate(eos_model, prompts, max_new_tokens=8, ignore_eos=True) == free


def test_per_row_max_new_tokens(tiny_model, prompts):
    config, params = tiny_model.config, tiny_model.params
    counts = [1, 7, 4, 9]
    sampling = [SamplingConfig(**SAMPLED)] * len(prompts)
    result = gen.run_static_batch(params, config, prompts, counts, sampling, ignore_eos=True)
    assert [len(t) for t in result.tokens] == counts
    assert result.decode_steps == max(counts) - 1
    assert result.first_token_time <= result.end_time
    for i, (prompt, count) in enumerate(zip(prompts, counts)):
        alone = gen.run_static_batch(params, config, [prompt], [count], sampling[:1], row_ids=[i],
                                     ignore_eos=True)
        assert alone.tokens[0] == result.tokens[i], f"row {i}"


def test_kv_byte_accounting(tiny_model, prompts):
    config = tiny_model.config
    rows, counts = prompts[:3], [7, 2, 5]  # 3 rows -> batch 4; prompts <= 16 -> 16; 16 + 7 -> 64 slots
    result = gen.run_static_batch(tiny_model.params, config, rows, counts, [SamplingConfig()] * 3,
                                  ignore_eos=True)
    per_slot = 2 * config.num_kv_heads * config.head_dim * 4
    assert result.kv_bytes_allocated == config.num_layers * 4 * 64 * per_slot
    assert result.kv_bytes_used == (sum(LENGTHS[:3]) + sum(counts)) * config.kv_bytes_per_token(4)
    assert result.kv_bytes_used == (19 + 14) * 3 * per_slot
    # 7 steps (prefill + 6 decodes); each row holds its prompt plus min(step + 1, count) outputs
    held = [sum(len(p) + min(s + 1, c) for p, c in zip(rows, counts)) for s in range(7)]
    assert result.kv_bytes_used_mean == pytest.approx(sum(held) / 7 * config.kv_bytes_per_token(4))


@pytest.mark.parametrize("prompts, max_new, match", [
    ([[5, 6], []], 4, r"prompts\[1\] is empty"),
    ([[5, 263]], 4, r"prompts\[0\].*outside \[0, 263\)"),
    ([[-1, 5]], 4, r"prompts\[0\].*outside"),
    ([[5, 6]], 0, "max_new_tokens"),
    ([[5] * 10], 600, "max_position_embeddings"),
])
def test_validation_errors(tiny_model, prompts, max_new, match):
    with pytest.raises(ValueError, match=match):
        models.generate(tiny_model, prompts, max_new_tokens=max_new)


def test_run_static_batch_rejects_empty_batch(tiny_model):
    with pytest.raises(ValueError, match="non-empty"):
        gen.run_static_batch(tiny_model.params, tiny_model.config, [], [], [])


def test_generate_empty_prompt_list_names_prompts(tiny_model):
    with pytest.raises(ValueError, match="prompts"):
        models.generate(tiny_model, [], max_new_tokens=4)


def test_run_static_batch_rejects_mismatched_rows(tiny_model):
    with pytest.raises(ValueError, match="one entry per row"):
        gen.run_static_batch(tiny_model.params, tiny_model.config, [[5], [6]], [3], [SamplingConfig()] * 2)


def test_negative_batch_size_rejected(tiny_model):
    with pytest.raises(ValueError, match="batch_size"):
        models.generate(tiny_model, [[5, 6]], max_new_tokens=2, batch_size=-1)


def test_request_that_fits_the_context_is_accepted(tiny_model):
    model = models.Model(tiny_model.config.replace(max_position_embeddings=100), tiny_model.params)
    out = models.generate(model, [[5] * 40], max_new_tokens=50, ignore_eos=True)
    assert len(out[0]) == 50


def test_same_bucketed_shapes_do_not_recompile(tiny_model, rng):
    # a config of its own so other tests' compilations do not interfere
    config = tiny_model.config.replace(name="tiny-compile-count")
    vocab = config.vocab_size

    def run(lengths, max_new):
        batch = [rng.integers(3, vocab, size=n).tolist() for n in lengths]
        gen.run_static_batch(tiny_model.params, config, batch, max_new, [SamplingConfig()] * len(lengths))

    before = gen.num_compilations()
    run([3, 9, 16], [5, 20, 1])  # batch 4, prompt 16, 64 slots
    first = gen.num_compilations()
    assert first == before + 2  # one prefill, one decode program
    run([1, 12, 7, 2], [30, 2, 3, 4])  # same buckets, different lengths and row count
    run([16, 4, 11], [48, 1, 1])
    assert gen.num_compilations() == first
