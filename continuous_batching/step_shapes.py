"""The shapes of the runner's jitted model step, and the set of those it has compiled.

A step's shape is six bucketed sizes (prefill tokens, prefill rows, decode rows, block-table width,
and on the XLA-CPU path the lengths of the decode page-pair and prefill tile-pair lists); each
distinct shape (with the sampler's static flags) is one compiled program. A server that must never
compile while serving (vLLM on TPU, JetStream) prepares its shapes at start-up and pads every later
step up to one of them. `ShapeSet` does that for the runner: it records the shapes compiled so far,
and once `frozen`, `cover(shape)` names the cheapest compiled shape of the same kind (decode-only,
or with prefill) that is at least as large in every size, so the step runs there on padding instead
of compiling. `envelope()` gives, per kind, the smallest shape that covers every shape seen: compiled
at start-up too, it guarantees a cover exists for every step no larger than what was seen.
Host-side, JAX-free.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, order=True)
class StepShape:
    prefill_tokens: int  # 0: a decode-only step (its own kind of program)
    prefill_seqs: int
    decode_seqs: int
    max_blocks: int  # block-table width
    decode_pairs: int  # CPU path: (sequence, page) pairs of the decode rows (0: none or other backend)
    prefill_pairs: int  # CPU path: (query tile, key chunk) pairs of the prefill rows

    @property
    def decode_only(self) -> bool:
        return self.prefill_tokens == 0

    def covers(self, other: "StepShape") -> bool:
        """Same kind, and at least as large in every size (so `other`'s step fits on padding)."""
        return self.decode_only == other.decode_only and all(
            a >= b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other)))

    def cost(self) -> int:
        """A rough measure of the work a step of this shape does whatever its content: tokens
        through the weights, and attention pairs (for choosing the cheapest cover)."""
        return 64 * (self.prefill_tokens + self.prefill_seqs + self.decode_seqs) + self.decode_pairs \
            + 4 * self.prefill_pairs + self.max_blocks


class ShapeSet:
    """The (shape, static flags) pairs compiled so far; `frozen`: later steps pad up, never compile."""

    def __init__(self) -> None:
        self.compiled: set[tuple[StepShape, object]] = set()
        self.frozen = False
        self.padded_steps = 0  # steps run on a larger compiled shape than their own

    def add(self, shape: StepShape, flags) -> None:
        self.compiled.add((shape, flags))

    def cover(self, shape: StepShape, flags) -> StepShape | None:
        """The cheapest compiled shape with these flags that covers `shape` (None: there is none)."""
        candidates = [s for s, f in self.compiled if f == flags and s.covers(shape)]
        return min(candidates, key=StepShape.cost, default=None)

    def envelope(self) -> list[tuple[StepShape, object]]:
        """Per kind and flags: the elementwise maximum of every compiled shape of that kind (a
        prefill step's decode rows and decode pairs also cover those of decode-only steps)."""
        out = []
        for flags in {f for _, f in self.compiled}:
            shapes = [s for s, f in self.compiled if f == flags]
            decode = [s for s in shapes if s.decode_only]
            prefill = [s for s in shapes if not s.decode_only]
            if decode:
                out.append((_elementwise_max(decode), flags))
            if prefill:
                widest = _elementwise_max(prefill + decode)
                out.append((dataclasses.replace(widest, prefill_tokens=max(s.prefill_tokens for s in prefill)), flags))
        return out


def _elementwise_max(shapes: list[StepShape]) -> StepShape:
    return StepShape(*(max(values) for values in zip(*(dataclasses.astuple(s) for s in shapes))))
