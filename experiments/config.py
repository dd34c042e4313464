"""Experiment config: one YAML file = a model, a workload, and named runs to compare side by side.

    experiment: quickstart
    model: smollm2-135m            # preset name, HF checkpoint folder, or .gguf path
    workload: {kind: sharegpt, num_requests: 32, request_rate: inf, seed: 0, max_output_len: 64}
    runs:
      - {name: hf-generate, engine: hf, batch_size: 8}
      - {name: naive-static, engine: static, batch_size: 8}
    smoke: {model: tiny, workload: {kind: alpaca, num_requests: 4}}   # merged in by --smoke

Unknown keys and bad values raise `ConfigError` naming the key and the allowed values, before any
model loads: first each key on its own (pydantic), then the keys together
(`experiments/config_checks.py`: claims' metrics, rate sweeps, keys a run would ignore, sizes that
could only fail later). `check_against_model` adds what the model's config (read without its
weights, `read_model_config`) reveals.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from continuous_batching.engine_config import (ADMISSIONS, KERNEL_SETS, KV_CACHE_DTYPES, KV_MEMORIES, POLICIES,
                                               EngineConfig)
from continuous_batching.reservation import RESERVATIONS
from continuous_batching.scheduler import PREEMPTION_MODES
from distributed.projection import DEFAULT_KV_TOKENS, GPUS, LLAMA2
from experiments.config_checks import check_config, check_model_limits
from paged_attention.backend_names import PAGED_BACKENDS
from quantization.scheme_names import BLOCK_FORMAT_NAMES, QUANTIZATIONS


class ConfigError(ValueError):
    """An experiment config is invalid; the message names the key and what is allowed."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkloadConfig(Strict):
    """Which requests arrive, and when."""

    kind: Literal["sharegpt", "alpaca", "fixed"]  # fixed: every request max_prompt_len in, max_output_len out
    num_requests: int = Field(gt=0)
    request_rate: float = Field(default=math.inf, gt=0)  # requests/s, Poisson; inf = all at t=0
    seed: int = Field(default=0, ge=0)  # numpy's Generator seeds are >= 0
    max_prompt_len: int | None = Field(default=None, gt=0)  # longer prompts are truncated
    max_output_len: int | None = Field(default=None, gt=0)  # longer outputs are capped
    shared_prefix_len: int = Field(default=0, ge=0)  # same random tokens before every prompt (few-shot preamble)

    @model_validator(mode="after")
    def _fixed_needs_lengths(self) -> "WorkloadConfig":
        if self.kind == "fixed" and (self.max_prompt_len is None or self.max_output_len is None):
            raise ValueError("kind 'fixed' needs max_prompt_len and max_output_len (every request's lengths)")
        return self


class StaticRunConfig(Strict):
    """Our naive engine: FasterTransformer-style static batches on a contiguous KV cache."""

    name: str
    engine: Literal["static"]
    batch_size: int = Field(default=8, gt=0)


class HFRunConfig(Strict):
    """Baseline: HF transformers `generate` (torch, CPU) in static batches, same weights."""

    name: str
    engine: Literal["hf"]
    batch_size: int = Field(default=8, gt=0)


class MemorySimRunConfig(Strict):
    """KV-memory simulation (vLLM Fig. 2 / 13): no model runs; see experiments/memory_sim.py."""

    name: str
    engine: Literal["memory_sim"]
    reservation: Literal[(*RESERVATIONS, "paged")]
    kv_budget_tokens: int = Field(gt=0)  # KV slots available in all
    max_len: int = Field(default=2048, gt=0)  # what Orca (Max) reserves per request
    block_size: int = Field(default=16, gt=0)  # paged only
    watermark: float = Field(default=0.01, ge=0, lt=1)  # paged: admit only if this share of blocks stays free (vLLM's default)


class SharingRunConfig(Strict):
    """KV blocks saved by sharing (vLLM Fig. 15): parallel sampling (no model runs) or beam search
    (the model runs); see experiments/sharing.py."""

    name: str
    engine: Literal["sharing_sim"]
    mode: Literal["parallel_sampling", "beam_search"]
    width: int = Field(ge=2)  # parallel samples per request (n), or the beam width
    block_size: int = Field(default=16, gt=0)
    max_requests: int = Field(default=20, gt=0)  # beam search only: the first this many requests
    seed: int = Field(default=0, ge=0)  # parallel sampling only: draws of the other samples' output lengths


class AttentionBenchRunConfig(Strict):
    """Decode-attention micro-benchmark, contiguous vs paged at equal shapes (experiments/attention_bench.py)."""

    name: str
    engine: Literal["attention_bench"]
    backend: Literal["contiguous", "paged_reference", "paged"]
    batch_size: int = Field(default=8, gt=0)
    context_len: int = Field(gt=0)
    block_size: int = Field(default=16, gt=0)  # paged backends
    iterations: int = Field(default=50, gt=0)


def _engine_default(field: str):
    return EngineConfig.__dataclass_fields__[field].default


class FusionBenchRunConfig(Strict):
    """Kernel fusion: one decoder layer and each op in it under one ops set, at a decode batch or a
    prefill chunk (experiments/fusion_bench.py)."""

    name: str
    engine: Literal["fusion_bench"]
    kernels: Literal[KERNEL_SETS]
    phase: Literal["decode", "prefill"]
    batch_size: int = Field(default=1, gt=0)  # decode: sequences in the step
    context_len: int = Field(default=256, gt=0)  # decode: each sequence's context, this token included
    prompt_len: int = Field(default=512, gt=0)  # prefill: one sequence's prompt, all in the step
    fuse_weights: bool = False  # xla only: run on the fused wqkv / w_gate_up layout (pallas always does)
    backend: Literal[PAGED_BACKENDS] = _engine_default("backend")
    block_size: int = Field(default=16, gt=0)
    iterations: int = Field(default=10, gt=0)


class QuantEvalRunConfig(Strict):
    """Quantization: one scheme's size, accuracy and speed on the experiment's model
    (experiments/quant_eval.py; quantization/scheme_names.py lists the schemes)."""

    name: str
    engine: Literal["quant_eval"]
    quantization: Literal[QUANTIZATIONS]
    perplexity_windows: int = Field(default=8, gt=0)  # windows of lee_background.cor scored
    window: int = Field(default=512, gt=1)  # tokens per perplexity window
    context_len: int = Field(default=256, gt=0)  # decode timing: each sequence's context
    prompt_len: int = Field(default=512, gt=0)  # prefill timing: one sequence's prompt
    iterations: int = Field(default=9, gt=0)  # timed steps per measurement (median)
    calibration_windows: int = Field(default=16, gt=0)  # calibrated schemes: 256-token windows of ShareGPT prompts
    kv_cache_dtype: Literal["auto", "int8"] = "auto"  # int8: calibrated K / V scales folded in first, accuracy via the paged path


class ContinuousRunConfig(Strict):
    """The continuous-batching engine (`continuous_batching.Engine`; experiments/continuous_engine.py).

    Besides `name` and `engine`, every key is an `EngineConfig` field of the same name, meaning and
    default (continuous_batching/engine_config.py), passed to it as given and validated by it; two
    defaults are the harness's, and one is filled from the workload:
    `num_blocks` 4096 (a 64Ki-token cache at block_size 16) and `max_num_seqs` 256 (vLLM's default),
    sized for the real workloads; an unset `max_model_len` is the workload's longest request in whole
    blocks. `mesh` (a device object) and `seed` (the harness's requests are greedy) are not YAML keys.
    """

    name: str
    engine: Literal["continuous"]
    policy: Literal[tuple(POLICIES)] | None = None  # a preset, or the settings below one by one
    admission: Literal[ADMISSIONS] | None = None
    kv_memory: Literal[KV_MEMORIES] | None = None
    chunked_prefill: bool | None = None
    reservation: Literal[RESERVATIONS] = _engine_default("reservation")
    num_blocks: int = Field(default=4096, gt=0)
    block_size: int = Field(default=_engine_default("block_size"), gt=0)
    max_num_seqs: int = Field(default=256, gt=0)
    max_num_batched_tokens: int = Field(default=_engine_default("max_num_batched_tokens"), gt=0)
    max_model_len: int | None = Field(default=None, gt=0)  # None: the workload's longest request
    preemption: Literal[PREEMPTION_MODES] = _engine_default("preemption")
    num_cpu_blocks: int = Field(default=_engine_default("num_cpu_blocks"), ge=0)
    enable_prefix_caching: bool = _engine_default("enable_prefix_caching")
    backend: Literal[PAGED_BACKENDS] = _engine_default("backend")
    kernels: Literal[KERNEL_SETS] = _engine_default("kernels")
    kv_cache_dtype: Literal[KV_CACHE_DTYPES] = _engine_default("kv_cache_dtype")
    calculate_kv_scales: bool = _engine_default("calculate_kv_scales")  # fp8_e4m3: calibrated K / V scales
    tp: int = Field(default=_engine_default("tp"), gt=0)  # tensor parallel over tp devices (fake ones on CPU)
    pp: int = Field(default=_engine_default("pp"), gt=0)  # pipeline stages, each on tp devices
    offload_layers: int = Field(default=_engine_default("offload_layers"), ge=0)  # last layers kept in host memory


class LlamaCppRunConfig(Strict):
    """Baseline: llama.cpp (llama-cpp-python, optional extra) on the model's GGUF weights written as
    F32, at batch 1 (experiments/baselines/llama_cpp.py) or with `parallel` slots
    (experiments/baselines/llama_cpp_parallel.py)."""

    name: str
    engine: Literal["llama-cpp"]
    n_threads: int | None = Field(default=None, gt=0)  # None: every core
    # sequences decoded together (llama-server -np N: experiments/baselines/llama_cpp_parallel.py);
    # 1: one request at a time
    parallel: int = Field(default=1, ge=1, le=512)


class LlamaCppQuantRunConfig(Strict):
    """Baseline: llama.cpp's rows of the quantization table, on a GGUF we write with the linear
    weights in one block format (experiments/baselines/llama_cpp_quant.py); the other keys mean
    what `quant_eval`'s do."""

    name: str
    engine: Literal["llama-cpp-quant"]
    quantization: Literal[("none", *BLOCK_FORMAT_NAMES)]  # none: every tensor F32
    perplexity_windows: int = Field(default=8, gt=0)
    window: int = Field(default=512, gt=1)
    context_len: int = Field(default=256, gt=1)
    prompt_len: int = Field(default=512, gt=0)
    iterations: int = Field(default=5, gt=0)
    n_threads: int | None = Field(default=None, gt=0)  # None: every core


class ParallelEvalRunConfig(Strict):
    """Parallelism: one tensor x pipeline layout of the experiment's model on tp x pp devices (fake
    CPU devices without accelerators): memory per device, collectives per decode step from the
    compiled HLO beside Megatron's count, step times, logits vs one device (experiments/parallel_eval.py)."""

    name: str
    engine: Literal["parallel_eval"]
    tp: int = Field(default=1, gt=0)  # tensor-parallel degree (Megatron layout, distributed/tensor_parallel.py)
    pp: int = Field(default=1, gt=0)  # pipeline stages (distributed/pipeline.py, continuous_batching/pipeline_runner.py)
    microbatches: int = Field(default=1, gt=0)  # pp > 1: micro-batches the prefill batch is cut into
    offload_layers: int = Field(default=0, ge=0)  # tp = pp = 1: the last layers' weights stay in host memory
    batch_size: int = Field(default=8, gt=0)  # sequences in the decode step and in the prefill forward
    context_len: int = Field(default=128, gt=0)  # decode: each sequence's context
    prompt_len: int = Field(default=128, gt=0)  # prefill: each sequence's prompt
    iterations: int = Field(default=5, gt=0)  # timed steps per measurement (median)


class ParallelProjectionRunConfig(Strict):
    """Paper-scale projection: a published model's smallest tp x pp layout on one GPU type and what
    it implies per token, from distributed/projection.py's model (experiments/parallel_projection.py)."""

    name: str
    engine: Literal["parallel_projection"]
    model_shape: Literal[tuple(LLAMA2)]
    gpu: Literal[tuple(GPUS)]
    kv_tokens: int = Field(default=DEFAULT_KV_TOKENS, gt=0)  # KV cache each layout must hold, in tokens
    bytes_per_param: float = Field(default=2.0, gt=0)  # 2: fp16 / bf16 weights


class GemmRooflineRunConfig(Strict):
    """The f32 GEMM speed of this machine as a decode-rate bound for the model (experiments/roofline.py)."""

    name: str
    engine: Literal["gemm_roofline"]
    size: int = Field(default=2048, gt=0)  # square GEMM size x size x size
    iterations: int = Field(default=20, gt=0)


# Every engine's run config; later issues add theirs here. The `engine` literal is the YAML tag.
RUN_CONFIGS = (StaticRunConfig, HFRunConfig, MemorySimRunConfig, SharingRunConfig,
               AttentionBenchRunConfig, ContinuousRunConfig, LlamaCppRunConfig, GemmRooflineRunConfig,
               FusionBenchRunConfig, QuantEvalRunConfig, LlamaCppQuantRunConfig, ParallelEvalRunConfig,
               ParallelProjectionRunConfig)
RUN_CONFIG_BY_ENGINE = {get_args(c.model_fields["engine"].annotation)[0]: c for c in RUN_CONFIGS}
RunConfig = Annotated[Union[RUN_CONFIGS], Field(discriminator="engine")]


class ClaimConfig(Strict):
    """A published number and the metric of ours that reproduces it (optionally as a ratio)."""

    claim: str
    source: str
    paper: float
    unit: str
    run: str  # our run whose metric is compared
    metric: str
    ratio_to: str | None = None  # another run: ours = run's metric / ratio_to's metric


class ExperimentConfig(Strict):
    experiment: str
    description: str = ""
    model: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16"] = "float32"
    random_weights: bool = False
    workload: WorkloadConfig
    runs: list[RunConfig] = Field(min_length=1)
    claims: list[ClaimConfig] = []
    # Throughput vs request rate (vLLM Fig. 12): every run at each rate, same requests, new arrivals.
    request_rates: list[Annotated[float, Field(gt=0)]] | None = Field(default=None, min_length=1)
    latency_bound_s_per_token: float = Field(default=1.0, gt=0)  # "sustained": mean normalized latency below this
    check_same_outputs: bool = False  # every run that records its tokens must give every request the same ones
    # what each run does before its clock starts (the same rule for every engine of the experiment):
    # untimed_pass: serve the whole workload once, untimed; precompile: compile every program the
    # workload reaches without serving it (engines that compile nothing do nothing); none
    # (correctness runs): compile time is timed
    warmup: Literal["untimed_pass", "precompile", "none"] = "untimed_pass"

    @field_validator("runs")
    @classmethod
    def _unique_names(cls, runs: list[Any]) -> list[Any]:
        names = [r.name for r in runs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"run names must be unique; repeated: {duplicates}")
        return runs


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at `loc` (the path of an unknown key), for the error message."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if current is ExperimentConfig and part == "runs":
            continue  # the union: resolved by the discriminator tag below
        if part in RUN_CONFIG_BY_ENGINE:
            current = RUN_CONFIG_BY_ENGINE[part]
            continue
        field = current.model_fields.get(part)
        current = getattr(field, "annotation", None)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid experiment config {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc
                        if p not in RUN_CONFIG_BY_ENGINE).replace(".[", "[")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(ExperimentConfig, loc)
            lines.append(f"  {path}: unknown key; allowed keys: {', '.join(allowed)}")
        else:
            got = f" (got {e.get('input')!r})" if loc else ""
            lines.append(f"  {path or '(top level)'}: {e['msg']}{got}")
    return "\n".join(lines)


def parse_config(data: dict, *, smoke: bool = False, source: str = "<dict>") -> ExperimentConfig:
    """Validate a config dict; with smoke=True its `smoke:` overrides are merged in first."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid experiment config {source}: expected a mapping at the top level")
    data = dict(data)
    overrides = data.pop("smoke", None) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"invalid experiment config {source}: 'smoke' must be a mapping of overrides")
    if smoke:
        data = _deep_merge(data, overrides)
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None
    _raise_problems(check_config(config), source)
    return config


def _raise_problems(problems: list[tuple[str, str]], source: str) -> None:
    if problems:
        raise ConfigError("\n".join([f"invalid experiment config {source}:"]
                                     + [f"  {path}: {message}" for path, message in problems]))


def check_against_model(config: ExperimentConfig, model_config, *, source: str = "<config>") -> None:
    """Raise ConfigError if the config asks more of the model than its config allows (a
    `models.config.ModelConfig`, e.g. from `experiments.model_source.read_model_config`; None
    checks nothing): sequence
    lengths beyond its `max_position_embeddings`. The harness calls it before loading the weights."""
    if model_config is not None:
        _raise_problems(check_model_limits(config, model_config), f"{source} for model {config.model!r}")


def load_config(path: str | Path, *, smoke: bool = False) -> ExperimentConfig:
    """Read and validate a YAML experiment config."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read experiment config {path}: {err}") from None
    return parse_config(data, smoke=smoke, source=str(path))
