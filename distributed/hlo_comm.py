"""What a compiled program sends between devices, read from its optimized HLO text.

XLA's SPMD partitioner writes each collective as one HLO instruction whose result shape says how
much it moves, e.g.

    %all-reduce.3 = f32[4,576]{1,0} all-reduce(f32[4,576]{1,0} %dot.2), channel_id=2, replica_groups=...

`collectives(hlo)` counts them by kind with the bytes of their results (an asynchronous pair,
`all-gather-start` / `-done`, counts once, at its `-done`, whose shape is the result: a `-start`'s
tuple also holds the input and sync flags; a tuple result counts every element). The result bytes
are the payload (for an all-reduce, the tensor every device ends up holding); what
the wires carry depends on the algorithm (a ring all-reduce sends 2 (n - 1) / n of it per device).
"""

from __future__ import annotations

import re

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_INSTRUCTION = re.compile(r"=\s*(?P<shape>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
                          r"(?P<kind>" + "|".join(KINDS) + r")(?:-done)?\(")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "f8e4m3fn": 8, "f8e5m2": 8}


def _dtype_bits(dtype: str) -> int:
    if dtype in _BITS:
        return _BITS[dtype]
    return int(re.search(r"[0-9]+$", dtype).group())  # f32, bf16, s8, u32, ...


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO result shape: `f32[4,576]{1,0}`, or a tuple `(f32[4], s32[2])`."""
    total = 0
    for array in _ARRAY.finditer(shape):
        dims = [int(d) for d in array["dims"].split(",") if d]
        total += int(np.prod(dims, dtype=np.int64)) * _dtype_bits(array["dtype"]) // 8
    return total


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{kind: {"count": instructions, "bytes": summed result bytes}} for every collective kind
    (zeros for those the program does not use)."""
    found = {kind: {"count": 0, "bytes": 0} for kind in KINDS}
    for match in _INSTRUCTION.finditer(hlo):
        found[match["kind"]]["count"] += 1
        found[match["kind"]]["bytes"] += shape_bytes(match["shape"])
    return found
