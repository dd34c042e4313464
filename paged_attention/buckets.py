"""Size bucketing: the rounding rules that keep `jax.jit` to a bounded number of compiled programs
(and that Orca's pow2 reservation uses). Host-side, JAX-free; every package rounds sizes here.

    pow2_at_least(n, minimum)   1, 2, 4, 8, ...: batch rows, block-table widths, reservations
    two_per_octave(n, minimum)  4, 6, 8, 12, 16, 24, ...: token counts (at most 1.5x padding)
    round_up(n, multiple)       the next multiple: long static-batch prompts, cache lengths
"""

from __future__ import annotations


def pow2_at_least(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum) (1 for n <= 1)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def two_per_octave(n: int, minimum: int) -> int:
    """Round up to the next m * 2^k / 4 for m in {4, 6} (at most 1.5x padding, 2 sizes per octave)."""
    n = max(int(n), minimum)
    power = 1 << max(0, (n - 1).bit_length() - 1)
    for multiplier in (4, 6):
        if power * multiplier // 4 >= n:
            return power * multiplier // 4
    return 2 * power


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple
