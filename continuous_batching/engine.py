"""The serving engine: requests in, tokens out, one scheduler step at a time.

    engine = Engine(models.load("smollm2-135m"), EngineConfig(policy="continuous"))
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=64, temperature=0))
    while engine.has_unfinished():
        for out in engine.step(): ...        # RequestOutput: new tokens per request, finished flag
    engine.generate(prompts, params)         # the same loop with a progress bar

Each step: the scheduler plans (`scheduler.py`), the model runner carries out the plan's block moves
on the device cache (swap-out, copy-on-write, swap-in, in that order), runs one jitted model step and
samples on device (`model_runner.py`), and the scheduler records the tokens. A
request with `n > 1` runs as n sequences (with prefix caching on, they share the prompt's blocks).
A request with `beam_width > 1` runs beam search above the scheduler, as vLLM V1 does
(`beam_search.py`): each round, every live beam is a one-token sequence of prompt + beam tokens
asking for 2 * beam_width log-probs; when all of a round's sequences are done the beams advance and
the next round's sequences are queued. Its `RequestOutput` comes once, finished: the best n beams,
best first, with `cumulative_logprob`. Rounds reuse earlier rounds' KV only through prefix caching
(`EngineConfig.enable_prefix_caching`); without it each round recomputes every beam's prefix.
Bad input raises `ValueError` in `add_request`, naming the field; the engine's state is untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np
from tqdm.auto import tqdm

import models
from continuous_batching.beam_search import BeamSearchState, round_params
from continuous_batching.engine_config import EngineConfig
from continuous_batching.engine_stats import EngineStats
from continuous_batching.model_runner import PagedModelRunner, num_compilations
from continuous_batching.pipeline_runner import PipelineModelRunner
from continuous_batching.request import Sequence, Status
from continuous_batching.request_output import FINISH_REASONS, CompletionOutput, RequestOutput
from continuous_batching.reservation import ReservationManager
from continuous_batching.sampling_params import SamplingParams
from continuous_batching.scheduler import Scheduler
from continuous_batching.step_shapes import ShapeSet
from continuous_batching.stop_checker import StopChecker
from distributed.head_parallel import runner_ops
from distributed.mesh import axis_size, make_mesh
from distributed.offload import offload_placement
from distributed.tensor_parallel import runner_placement
from models.sampling import request_key
from paged_attention.block_manager import BlockManager
from quantization.kv_int8 import check_folded_scales

@dataclasses.dataclass
class _Request:
    request_id: int
    params: SamplingParams
    seqs: list[Sequence]  # beam search: the current round's, one per live beam
    stop: StopChecker | None
    logprobs: list[list] = dataclasses.field(default_factory=list)  # per sample
    beam: BeamSearchState | None = None  # beam search only

    @functools.cached_property
    def seq_params(self) -> SamplingParams:
        """What the runner samples this request's sequences with (built once: read every step)."""
        return self.params if self.beam is None else round_params(self.params)


class Engine:
    """Continuous-batching engine over one model (see the module docstring)."""

    def __init__(self, model: models.Model, config: EngineConfig = EngineConfig(), *, shapes: ShapeSet | None = None,
                 dry_run: bool = False):
        """shapes: the compiled step-shape set to use (a server shares one across engines and
        freezes it after its warm-up, `step_shapes.py`); None: a fresh one. dry_run: precompile by
        a dry run of the scheduler: a step runs the model only when its shape is new, and otherwise
        each sequence "samples" its last new token again (so requests should ignore EOS)."""
        self.model, self.config = model, config
        limit = model.config.max_position_embeddings
        if config.max_model_len > limit:
            raise ValueError(f"EngineConfig.max_model_len ({config.max_model_len}) must be <= the model's "
                             f"max_position_embeddings ({model.config.name}: {limit})")
        if config.calculate_kv_scales:
            check_folded_scales(model.params, config.kv_cache_dtype, "EngineConfig.calculate_kv_scales")
        self.mesh = make_mesh(tp=config.tp, pp=config.pp) if config.tp * config.pp > 1 else config.mesh
        if config.paged:
            self.manager = BlockManager(config.num_blocks, config.block_size, config.num_cpu_blocks,
                                        config.enable_prefix_caching)
            reserve = None
        else:
            self.manager = ReservationManager(config.num_blocks, config.block_size)
            reserve = lambda seq: config.kv_tokens_needed(len(seq.prompt), seq.max_tokens)
        self.scheduler = Scheduler(self.manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   chunked_prefill=config.chunks_prompts,
                                   preemption=config.preemption, admit_when_idle=config.batch_admission,
                                   reserve=reserve)
        runner = PipelineModelRunner if axis_size(self.mesh, "pp") > 1 else PagedModelRunner
        self.runner = runner(model, num_blocks=config.num_blocks, block_size=config.block_size,
                             max_num_seqs=config.max_num_seqs, max_blocks_per_seq=config.max_blocks_per_seq,
                             backend=config.backend, kernels=runner_ops(model.config, self.mesh, config.kernels),
                             num_cpu_blocks=config.num_cpu_blocks,
                             kv_cache_dtype=config.kv_cache_dtype, mesh=self.mesh, **self._placement())
        if shapes is not None:
            self.runner.shapes = shapes
        self.runner.dry_run = dry_run
        self.requests: dict[int, _Request] = {}
        self._request_ids, self._seq_ids = itertools.count(), itertools.count()
        self.stats = EngineStats()

    def _placement(self) -> dict:
        """The runner's param / cache placement: Megatron's on a mesh (a pipelined runner places its
        stages itself), host offload of the last `offload_layers` layers on one device, or the
        default device."""
        if self.config.offload_layers:
            layers = self.model.config.num_layers
            if self.config.offload_layers > layers:
                raise ValueError(f"EngineConfig.offload_layers ({self.config.offload_layers}) must be <= the "
                                 f"model's {layers} layers ({self.model.config.name})")
            return offload_placement(self.config.offload_layers)
        if axis_size(self.mesh, "pp") > 1:
            return {}
        return runner_placement(self.model.config, self.mesh)

    # ----- requests ----------------------------------------------------------------------------
    def add_request(self, prompt: list[int] | str, params: SamplingParams | dict | None = None) -> int:
        """Queue a request; returns its id. Raises ValueError (naming the field) on bad input."""
        params = SamplingParams() if params is None else params
        params = SamplingParams.from_dict(params) if isinstance(params, dict) else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams or a dict, got {type(params).__name__}")
        params.check_vocab(self.model.config.vocab_size)
        prompt = self._prompt_ids(prompt)
        self._check_fits(len(prompt), params)
        if params.stop and self.model.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a model with a tokenizer; use stop_token_ids")
        request_id = next(self._request_ids)
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(self.model.config.eos_token_ids))
        if params.beam_width > 1:
            request = self.requests[request_id] = _Request(request_id, params, [], None,
                                                           beam=BeamSearchState.start(prompt, params, stop_ids))
            self._start_round(request)
            return request_id
        stop = StopChecker(self.model.tokenizer, params.stop) if params.stop else None
        request = self.requests[request_id] = _Request(request_id, params, [], stop,
                                                       [[] for _ in range(params.n)])
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), list(prompt), params.max_tokens, stop_ids, params=params,
                           request=request, index=index)
            seq.key = request_key(params.seed, index) if params.seed is not None else \
                request_key(self.config.seed, seq.seq_id)
            request.seqs.append(seq)
        for seq in request.seqs:
            self.scheduler.add(seq)
        return request_id

    def _start_round(self, request: _Request) -> None:
        """Queue one greedy one-token sequence per live beam (prompt + the beam's tokens)."""
        request.seqs = [Sequence(next(self._seq_ids), tokens, 1, params=request.seq_params, request=request,
                                 index=index) for index, tokens in enumerate(request.beam.round_prompts())]
        for seq in request.seqs:
            self.scheduler.add(seq)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.model.tokenizer is None:
                raise ValueError("prompt is a string but the model has no tokenizer; pass token ids")
            prompt = self.model.tokenizer(prompt).input_ids
        vocab = self.model.config.vocab_size
        if not (isinstance(prompt, (list, tuple)) and prompt and all(
                isinstance(t, (int, np.integer)) and 0 <= t < vocab for t in prompt)):
            raise ValueError(f"prompt must be a non-empty list of token ids in [0, {vocab}) or a string")
        return [int(t) for t in prompt]

    def _check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        c = self.config
        if prompt_len + params.max_tokens > c.max_model_len:
            raise ValueError(f"prompt ({prompt_len} tokens) + SamplingParams.max_tokens ({params.max_tokens}) "
                             f"must be <= max_model_len={c.max_model_len}")
        needed = c.kv_tokens_needed(prompt_len, params.max_tokens)
        if -(-needed // c.block_size) > c.num_blocks:
            raise ValueError(f"the request needs {needed} tokens of KV cache, more than num_blocks="
                             f"{c.num_blocks} x block_size={c.block_size} hold")
        beam = params.beam_width > 1  # beam search's last round prompts prompt + max_tokens - 1 tokens
        whole_prompts = not (c.chunks_prompts or c.batch_admission)  # a prompt must fit one step's budget
        if whole_prompts and prompt_len + beam * (params.max_tokens - 1) > c.max_num_batched_tokens:
            raise ValueError(f"prompt ({prompt_len} tokens{' + max_tokens - 1 beam tokens' if beam else ''}) must "
                             f"be <= max_num_batched_tokens={c.max_num_batched_tokens} (or use chunked_prefill)")

    def abort(self, request_id: int) -> None:
        """Stop a request wherever it is; its blocks are freed. Unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        for seq in request.seqs if request else []:  # beam search: the current round's
            if not seq.status.finished:
                self.scheduler.abort(seq.seq_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ----- stepping ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns an output for every request that got tokens (or finished)."""
        plan = self.scheduler.schedule()
        if not plan.seqs:
            if self.scheduler.has_work() and not self.scheduler.running:
                raise RuntimeError("no sequence could be scheduled although the cache is empty")
            return []
        self.runner.move_blocks(plan.swap_out, plan.block_copies, plan.swap_in)
        self.stats.record(plan)
        result = self.runner.step([p.seq for p in plan.seqs])
        sampling = [(i, p.seq) for i, p in enumerate(plan.seqs) if p.samples]
        self.scheduler.update(plan, {seq.seq_id: result.tokens[i] for i, seq in sampling})
        touched: dict[int, list[int]] = {}
        rounds_done: list[_Request] = []
        for i, seq in sampling:
            request, index = seq.request, seq.index
            request_id = request.request_id
            if request.beam is not None:  # a one-token round sequence: it finished, report its candidates
                if request.beam.record(index, result.logprobs[i][1]):
                    rounds_done.append(request)
                continue
            if result.logprobs is not None and request.params.logprobs is not None:
                chosen, top = result.logprobs[i]
                request.logprobs[index].append((chosen, top[:request.params.logprobs]))
            if request.stop is not None and not seq.status.finished and request.stop.hit(seq.output):
                seq.status = Status.FINISHED_STOPPED
                self.scheduler.finish(seq)
            touched.setdefault(request_id, []).append(index)
        outputs = [self._output(request_id, new_for=indices) for request_id, indices in touched.items()]
        return outputs + [out for request in rounds_done if (out := self._next_round(request))]

    def _output(self, request_id: int, new_for: list[int]) -> RequestOutput:
        request = self.requests[request_id]
        outputs = []
        for index, seq in enumerate(request.seqs):
            text = None  # decoded once, when the sample finishes (streaming: decode new_token_ids)
            if seq.status.finished and self.model.tokenizer is not None:
                text = self.model.tokenizer.decode(seq.output)
            if request.stop is not None and text is not None:
                text = request.stop.truncate(text)
            outputs.append(CompletionOutput(
                index, list(seq.output), seq.output[-1:] if index in new_for else [], text,
                FINISH_REASONS.get(seq.status),
                request.logprobs[index] if request.params.logprobs is not None else None))
        finished = all(seq.status.finished for seq in request.seqs)
        if finished:
            del self.requests[request_id]
        return RequestOutput(request_id, list(request.seqs[0].prompt), outputs, finished)

    def _next_round(self, request: _Request) -> RequestOutput | None:
        """A beam request's round is done (its beams advanced): queue the next round, or finish
        with the best n beams."""
        if not request.beam.finished:
            self._start_round(request)
            return None
        del self.requests[request.request_id]
        outputs = []
        for rank, beam in enumerate(request.beam.best(request.params.n)):
            tokens = list(beam.tokens)
            text = None if self.model.tokenizer is None else self.model.tokenizer.decode(tokens)
            outputs.append(CompletionOutput(rank, tokens, list(tokens), text, "stop" if beam.stopped else "length",
                                            None, beam.cum_logprob))
        return RequestOutput(request.request_id, list(request.beam.prompt), outputs, True)

    def generate(self, prompts: list[list[int] | str], params: SamplingParams | list[SamplingParams] | None = None,
                 *, progress: bool = True) -> list[RequestOutput]:
        """Run prompts to completion (outputs in prompt order), with a tqdm bar over requests."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        done: dict[int, RequestOutput] = {}
        with tqdm(total=len(ids), desc=f"generate ({self.config.name})", disable=not progress) as bar:
            while self.has_unfinished():
                for out in self.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]

    @property
    def num_steps(self) -> int:
        return self.stats.num_steps

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def prefix_cache_usage(self) -> tuple[float, float]:
        """(prefix-cache hit rate over the full prompt blocks looked up, fraction of admitted tokens
        found cached), both 0.0 without prefix caching."""
        hit_rate = self.manager.hit_rate if self.config.enable_prefix_caching else 0.0
        return hit_rate, self.scheduler.cached_tokens / max(1, self.scheduler.admitted_tokens)

    def kv_usage(self) -> tuple[int, int]:
        """(tokens whose K/V the cache holds, KV blocks in use) right now."""
        return self.manager.num_real_tokens, self.manager.num_used_blocks

    @property
    def num_compilations(self) -> int:
        """Model-step programs compiled so far in this process (shared jit cache)."""
        return num_compilations()
