"""The timing helpers call each function in turn, warm up untimed, and return one median per function."""

from __future__ import annotations

import itertools

from experiments.roofline import median_seconds, paired_median_seconds


def test_paired_timing_alternates_and_warms_up_untimed():
    calls = []
    fns = [lambda name=name: calls.append(name) for name in "ab"]
    medians = paired_median_seconds(fns, iterations=3, warmups=2)
    assert calls == list("ab" * 5)
    assert len(medians) == 2 and all(m >= 0 for m in medians)


def test_the_median_is_of_the_timed_calls_only(monkeypatch):
    clock = itertools.count()
    monkeypatch.setattr("experiments.roofline.time.perf_counter", lambda: float(next(clock)) ** 2)
    # timed call i reads the clock at 2i and 2i + 1 (warm-up reads nothing): durations 1, 5, 9 -> median 5
    assert median_seconds(lambda: None, iterations=3) == 5.0
