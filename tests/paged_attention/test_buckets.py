"""The one set of size-rounding rules (JAX-free)."""

from paged_attention.buckets import is_pow2, pow2_at_least, round_up, two_per_octave


def test_pow2_at_least():
    assert [pow2_at_least(n) for n in (0, 1, 2, 3, 4, 5, 17)] == [1, 1, 2, 4, 4, 8, 32]
    assert pow2_at_least(3, minimum=16) == 16 and pow2_at_least(33, minimum=16) == 64


def test_two_per_octave_pads_at_most_one_and_a_half():
    sizes = sorted({two_per_octave(n, 16) for n in range(1, 2049)})
    assert sizes[:6] == [16, 24, 32, 48, 64, 96] and sizes[-1] == 2048
    assert all(n <= two_per_octave(n, 1) <= max(1.5 * n, 2) for n in range(1, 5000))


def test_round_up_and_is_pow2():
    assert [round_up(n, 64) for n in (1, 64, 65)] == [64, 64, 128]
    assert [n for n in range(20) if is_pow2(n)] == [1, 2, 4, 8, 16]
