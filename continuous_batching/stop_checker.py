"""Stop strings: finish a sequence once its detokenized output contains one (host-side).

vLLM semantics: the output text is cut just before the stop string; the token ids keep the token
that completed it. Only the tail of the output is decoded each step (enough tokens to hold the
longest stop string, since every token decodes to at least one character or to nothing), so the
check costs the same at any output length.
"""

from __future__ import annotations


class StopChecker:
    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.window = max(len(s) for s in stop) + 8  # tokens to decode: a few spare for merges

    def hit(self, output_ids: list[int]) -> bool:
        """Whether the text of `output_ids` contains a stop string ending in its last token."""
        tail = self.tokenizer.decode(output_ids[-self.window:])
        before = self.tokenizer.decode(output_ids[-self.window:-1]) if len(output_ids) > 1 else ""
        return any(s in tail and s not in before for s in self.stop)

    def truncate(self, text: str) -> str:
        """The text up to (not including) the first stop string."""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
        return text[:cut]
