"""Step shapes and the compiled-shape set: covering, the cheapest cover, the envelope, and a frozen
runner that runs a new step on a compiled shape's padding with the same tokens."""

from __future__ import annotations

import pytest

import models
from continuous_batching.model_runner import PagedModelRunner
from continuous_batching.request import Sequence
from continuous_batching.step_shapes import ShapeSet, StepShape
from experiments.compile_watch import CompileWatch

in_cache = Sequence.in_cache  # a sequence whose earlier tokens are in the cache, bringing new ones

DECODE = StepShape(0, 0, 8, 16, 128, 0)
MIXED = StepShape(64, 2, 4, 16, 64, 64)


def test_a_shape_covers_smaller_shapes_of_its_own_kind_only():
    assert DECODE.covers(StepShape(0, 0, 4, 8, 64, 0)) and DECODE.covers(DECODE)
    assert not DECODE.covers(StepShape(0, 0, 16, 8, 64, 0))  # more decode rows
    assert not MIXED.covers(StepShape(0, 0, 4, 8, 64, 0))  # a decode-only step is another program
    assert MIXED.covers(StepShape(32, 1, 0, 8, 0, 64)) and not MIXED.covers(StepShape(96, 1, 0, 8, 0, 64))


def test_cover_picks_the_cheapest_compiled_shape_with_the_same_flags():
    shapes = ShapeSet()
    big, small = StepShape(256, 4, 8, 16, 128, 128), StepShape(48, 2, 4, 16, 64, 64)
    for shape in (big, small, DECODE):
        shapes.add(shape, "greedy")
    assert shapes.cover(StepShape(32, 1, 4, 8, 64, 64), "greedy") == small
    assert shapes.cover(StepShape(96, 1, 0, 8, 0, 64), "greedy") == big
    assert shapes.cover(StepShape(96, 1, 0, 8, 0, 64), "random") is None  # other flags: another program
    assert shapes.cover(StepShape(512, 1, 0, 8, 0, 64), "greedy") is None


def test_the_envelope_covers_every_shape_seen():
    shapes = ShapeSet()
    seen = [StepShape(256, 1, 0, 8, 0, 128), StepShape(48, 4, 8, 16, 64, 64), DECODE, StepShape(0, 0, 32, 8, 64, 0)]
    for shape in seen:
        shapes.add(shape, "greedy")
    envelope = dict((s.decode_only, s) for s, _ in shapes.envelope())
    assert envelope[True] == StepShape(0, 0, 32, 16, 128, 0)
    assert envelope[False] == StepShape(256, 4, 32, 16, 128, 128)
    assert all(any(e.covers(s) for e in envelope.values()) for s in seen)


def test_a_frozen_runner_pads_a_new_step_instead_of_compiling(tiny_model):
    def runner():
        return PagedModelRunner(tiny_model, num_blocks=32, block_size=4, max_num_seqs=4, max_blocks_per_seq=8)

    prompts = [[5, 9, 14, 3, 7, 8, 2, 11, 4, 6, 13, 1, 10], [3, 1, 4], [15, 9, 2, 6, 5]]
    warm = runner()
    warm.step([in_cache([0, 1, 2, 3], 13, prompts[0]), in_cache([4], 3, prompts[1])])  # 16 tokens, 2 rows
    warm.step([in_cache([8, 9], 5, prompts[2]), in_cache([0, 1, 2, 3], 14, [7])])  # prefill + decode
    warm.shapes.frozen = True
    for shape, flags in warm.shapes.envelope():
        warm.compile_shape(shape, flags)
    frozen, fresh = runner(), runner()
    frozen.shapes = warm.shapes
    step = [in_cache([4, 5], 5, prompts[2])]  # 1 prefill row: its own shape was never compiled
    with CompileWatch() as watch:
        tokens = frozen.step(step).tokens
    assert watch.programs == 0 and warm.shapes.padded_steps == 1
    assert tokens == fresh.step(step).tokens
    assert tokens == models.generate(tiny_model, [prompts[2]], max_new_tokens=1, ignore_eos=True)[0]
