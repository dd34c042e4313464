"""Device-side sampling: greedy, temperature, top-k, top-p, per-row keys and parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.sampling import SamplingArrays, SamplingConfig, blocked_argmax, sample, sampling_kind

sample_jit = jax.jit(sample, static_argnames="kind")
PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def draw(logits, configs, row_ids=None, step=0, kind=None) -> np.ndarray:
    """Sample once per row; logits f32[batch, vocab] (or one row broadcast to len(configs))."""
    logits = np.asarray(logits, np.float32)
    if logits.ndim == 1:
        logits = np.broadcast_to(logits, (len(configs), logits.shape[0]))
    arrays = SamplingArrays.from_configs(configs, row_ids)
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (len(configs),))
    kind = sampling_kind(configs) if kind is None else kind
    return np.asarray(sample_jit(jnp.asarray(logits), arrays, steps, kind=kind))


def many(config: SamplingConfig, n: int = 2000) -> list[SamplingConfig]:
    return [config] * n


@pytest.fixture
def logits(rng) -> np.ndarray:
    return (2.0 * rng.standard_normal((8, 50))).astype(np.float32)


def test_temperature_zero_is_argmax(logits):
    assert (draw(logits, many(SamplingConfig(seed=5), 8)) == logits.argmax(-1)).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 10.0])
def test_top_k_one_is_greedy(logits, temperature):
    got = draw(logits, many(SamplingConfig(temperature=temperature, top_k=1), 8))
    assert (got == logits.argmax(-1)).all()


def test_tiny_top_p_is_greedy(logits):
    got = draw(logits, many(SamplingConfig(temperature=3.0, top_p=1e-6), 8))
    assert (got == logits.argmax(-1)).all()


def test_sampled_tokens_lie_in_top_k(logits):
    row = logits[0]
    got = draw(row, many(SamplingConfig(temperature=5.0, top_k=5, seed=1)))
    top5 = set(np.argsort(-row)[:5].tolist())
    assert set(got.tolist()) == top5  # only the top 5 are drawn, and at this temperature all of them


def test_top_k_beyond_vocab_is_off(logits):
    configs = many(SamplingConfig(temperature=1.0, seed=2), 64)
    big_k = many(SamplingConfig(temperature=1.0, top_k=10_000, seed=2), 64)
    np.testing.assert_array_equal(draw(logits[0], configs), draw(logits[0], big_k))


def test_top_p_nucleus():
    got = draw(np.log(PROBS), many(SamplingConfig(temperature=1.0, top_p=0.7, seed=4), 4000))
    counts = np.bincount(got, minlength=4)
    assert counts[2] == counts[3] == 0
    np.testing.assert_allclose(counts[:2] / 4000, [0.5 / 0.8, 0.3 / 0.8], atol=0.03)


def test_temperature_applies_before_top_p():
    """At T=2 the probabilities flatten to ~(.38, .29, .21, .12): the 0.7 nucleus holds three tokens."""
    got = draw(np.log(PROBS), many(SamplingConfig(temperature=2.0, top_p=0.7, seed=4)))
    assert set(got.tolist()) == {0, 1, 2}


def test_same_seed_row_step_gives_same_token():
    flat = np.zeros(1000, np.float32)
    config = [SamplingConfig(temperature=1.0, seed=11)]
    first = [int(draw(flat, config, [7], step=s)[0]) for s in range(12)]
    again = [int(draw(flat, config, [7], step=s)[0]) for s in range(12)]
    assert first == again
    assert len(set(first)) > 6  # different steps draw different tokens
    other_row = [int(draw(flat, config, [8], step=s)[0]) for s in range(12)]
    other_seed = [int(draw(flat, [SamplingConfig(temperature=1.0, seed=12)], [7], step=s)[0])
                  for s in range(12)]
    assert other_row != first and other_seed != first


def test_empirical_frequencies_match_softmax():
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, 0.3], np.float32)
    temperature, n = 0.7, 4000
    got = draw(logits, many(SamplingConfig(temperature=temperature, seed=0), n), row_ids=list(range(n)))
    expected = np.asarray(jax.nn.softmax(logits / temperature))
    np.testing.assert_allclose(np.bincount(got, minlength=6) / n, expected, atol=0.03)


def test_rows_use_their_own_parameters():
    flat = np.zeros((2, 100), np.float32)
    flat[:, 42] = 0.5  # the argmax, but far from certain when sampled
    configs = [SamplingConfig(temperature=0.0, seed=3), SamplingConfig(temperature=1.0, top_k=50, seed=3)]
    rows = np.stack([draw(flat, configs, step=s) for s in range(30)])
    assert (rows[:, 0] == 42).all()
    assert len(set(rows[:, 1].tolist())) > 10


def test_row_result_independent_of_batch_mates(logits):
    """A row's token depends only on (seed, row id, step), not on other rows or the batch's kind."""
    plain = SamplingConfig(temperature=1.0, seed=9)
    alone = [int(draw(logits[3], [plain], [3], step=s, kind="random")[0]) for s in range(10)]
    mates = [SamplingConfig(temperature=0.5, top_k=3, seed=1), SamplingConfig(), plain]
    batch = [int(draw(logits[[0, 1, 3]], mates, [0, 1, 3], step=s)[2]) for s in range(10)]
    assert alone == batch


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"seed": "x"}, "seed"),
])
def test_sampling_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


def test_filters_flag():
    assert not SamplingConfig(top_k=5).filters  # greedy ignores filters
    assert SamplingConfig(temperature=1.0, top_k=5).filters
    assert SamplingConfig(temperature=1.0, top_p=0.9).filters
    assert not SamplingConfig(temperature=1.0).filters


def test_sampling_kind_is_the_cheapest_that_serves_all_rows(logits):
    greedy, hot, nucleus = SamplingConfig(top_k=5), SamplingConfig(temperature=1.0), SamplingConfig(temperature=1.0, top_p=0.9)
    assert sampling_kind([greedy, greedy]) == "greedy"
    assert sampling_kind([greedy, hot]) == "random"
    assert sampling_kind([greedy, hot, nucleus]) == "filtered"
    # a greedy row gives the argmax under every kind
    for kind in ("greedy", "random", "filtered"):
        assert draw(logits[0], [greedy], kind=kind)[0] == int(np.argmax(logits[0]))
    with pytest.raises(ValueError, match="sampling kind must be one of"):
        draw(logits[0], [greedy], kind="beam")


@pytest.mark.parametrize("vocab", [1, 7, 512, 1000, 1537])
def test_blocked_argmax_is_argmax_with_its_ties_and_nans(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.integers(-3, 3, (6, vocab)).astype(np.float32)  # many ties: the first maximum must win
    logits[1] = -np.inf  # not finite: plain argmax
    logits[2, vocab // 2:] = np.nan  # argmax returns the first NaN
    logits[3, -1] = 100.0  # the maximum in the last (padded) block
    for rows in (logits, logits[[0, 3, 4, 5]]):  # with rows that are not finite (plain argmax), and without
        got = np.asarray(jax.jit(blocked_argmax, static_argnums=1)(jnp.asarray(rows), 8 if vocab < 512 else 512))
        np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(rows), axis=-1)))
        assert got.dtype == np.int32
