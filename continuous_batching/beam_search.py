"""Beam search above the scheduler, as vLLM V1 runs it (`LLM.beam_search`): host-side, JAX-free.

The scheduler and the model runner know nothing of beams. Each round, every live beam of a request
becomes an ordinary one-token sequence whose prompt is the request's prompt + the beam's tokens
(`round_prompts`), run greedily with the top `2 * beam_width` raw log-probs of its next token
(`round_params`). Once every beam of the round has reported (`record`), `advance` expands each beam
by its candidates (cum_logprob + lp): a candidate ending in a stop token (EOS unless `ignore_eos`,
or one of `stop_token_ids`) is completed, the others are ranked by cum_logprob and the best
`beam_width` are the next round's beams. After `max_tokens` rounds, or when no live beam is left,
completed + live beams are ranked by `beam_score` and `best(n)` returns the top n.

KV reuse across rounds comes only from the engine's automatic prefix caching
(`EngineConfig.enable_prefix_caching`): a round's sequence finds its prompt's full blocks, computed
by the previous round, in the cache. Without it every round recomputes each beam's whole prefix:
the same tokens, more compute. The vLLM paper's in-engine beam search, forking block tables, is
what `experiments/sharing.py` measures memory with: it chooses its beams with this same
`BeamSearchState` and runs all beams of a step as one batch on a cache whose rows follow their
parents, where the engine runs a round of one-token sequences.
"""

from __future__ import annotations

import dataclasses

from continuous_batching.sampling_params import SamplingParams

Candidate = tuple[int, float]  # (token id, its log-prob under the beam's prefix)


@dataclasses.dataclass(frozen=True)
class Beam:
    tokens: tuple[int, ...] = ()  # output tokens (a completed beam's last one is its stop token)
    cum_logprob: float = 0.0  # sum of the tokens' raw log-probs
    stopped: bool = False  # ended with a stop token (completed before max_tokens)


def beam_score(beam: Beam, length_penalty: float = 1.0) -> float:
    """cum_logprob / output_len ** length_penalty, the final stop token not counted (vLLM's
    `get_beam_search_score`, over the output only, as HF's beam scorer; output_len >= 1)."""
    length = max(1, len(beam.tokens) - beam.stopped)
    return beam.cum_logprob / length ** length_penalty


def round_params(params: SamplingParams) -> SamplingParams:
    """What one round's sequences run with: one greedy token and 2 * beam_width raw log-probs.
    ignore_eos: the sequence never stops by itself, stop tokens are the beam state's business."""
    return SamplingParams(temperature=0, max_tokens=1, logprobs=2 * params.beam_width, ignore_eos=True)


@dataclasses.dataclass
class BeamSearchState:
    """One request's beams across rounds (see the module docstring)."""

    prompt: list[int]
    beam_width: int
    max_tokens: int  # rounds
    stop_token_ids: frozenset[int] = frozenset()
    length_penalty: float = 1.0
    beams: list[Beam] = dataclasses.field(default_factory=lambda: [Beam()])  # round 1: the empty beam
    completed: list[Beam] = dataclasses.field(default_factory=list)
    round: int = 0  # rounds done
    pending: dict[int, list[Candidate]] = dataclasses.field(default_factory=dict)  # this round's reports

    @classmethod
    def start(cls, prompt: list[int], params: SamplingParams, stop_token_ids: frozenset[int]) -> "BeamSearchState":
        return cls(list(prompt), params.beam_width, params.max_tokens, frozenset(stop_token_ids),
                   params.length_penalty)

    @property
    def finished(self) -> bool:
        return self.round >= self.max_tokens or not self.beams

    def round_prompts(self) -> list[list[int]]:
        """The prompt of each live beam's sequence this round, in beam order."""
        return [self.prompt + list(beam.tokens) for beam in self.beams]

    def record(self, beam_index: int, top_logprobs: list[Candidate]) -> bool:
        """Keep beam `beam_index`'s candidates: the best 2 * beam_width of its next token's
        `top_logprobs` (best first). Once every live beam has reported, `advance` and return True."""
        self.pending[beam_index] = list(top_logprobs[:2 * self.beam_width])
        if len(self.pending) < len(self.beams):
            return False
        candidates = [self.pending[i] for i in range(len(self.beams))]
        self.pending = {}
        self.advance(candidates)
        return True

    def advance(self, candidates_per_beam: list[list[Candidate]]) -> None:
        """One round: extend every live beam by each of its candidates; stop-token endings are
        completed, the best beam_width of the rest (by cum_logprob, stable) are the new beams."""
        if self.finished:
            raise ValueError("beam search already finished")
        if len(candidates_per_beam) != len(self.beams):
            raise ValueError(f"{len(candidates_per_beam)} candidate lists for {len(self.beams)} beams")
        live = []
        for beam, candidates in zip(self.beams, candidates_per_beam):
            for token, logprob in candidates:
                stopped = token in self.stop_token_ids
                new = Beam(beam.tokens + (token,), beam.cum_logprob + logprob, stopped)
                (self.completed if stopped else live).append(new)
        self.beams = sorted(live, key=lambda b: -b.cum_logprob)[:self.beam_width]
        self.round += 1

    def best(self, n: int) -> list[Beam]:
        """The n best of completed + live beams by `beam_score`, best first."""
        ranked = sorted(self.completed + self.beams, key=lambda b: -beam_score(b, self.length_penalty))
        return ranked[:n]
