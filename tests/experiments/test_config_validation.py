"""Bad configs fail at load time, before any model loads, naming the YAML path and the allowed values
(experiments/config_checks.py), and the engine's own checks against the model (no weights needed)."""

from __future__ import annotations

import copy
import time
from types import SimpleNamespace

import pytest

from experiments.config import ConfigError, check_against_model, parse_config
from experiments.model_source import read_model_config
from experiments.metric_names import SWEEP_ENGINES

WORKLOAD = {"kind": "alpaca", "num_requests": 3}


def config(*runs, workload=None, **top) -> dict:
    return {"experiment": "x", "workload": dict(workload or WORKLOAD), "runs": list(runs), **top}


def rejects(data: dict, *expected: str) -> str:
    """parse_config(data) raises ConfigError containing every `expected` line part, fast."""
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        parse_config(copy.deepcopy(data))
    assert time.perf_counter() - start < 1.0
    message = str(err.value)
    assert message.startswith("invalid experiment config <dict>:\n")
    for part in expected:
        assert part in message, message
    return message


def mem(reservation, **kw):
    return {"name": "m", "engine": "memory_sim", "reservation": reservation, **kw}


def cont(**kw):
    return {"name": "c", "engine": "continuous", **kw}


CAPPED = {"kind": "alpaca", "num_requests": 3, "max_prompt_len": 40, "max_output_len": 30}


# 1 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run, workload, expected, smallest_ok", [
    (mem("max", kv_budget_tokens=1000), WORKLOAD,
     "runs[0].kv_budget_tokens: 1000 cannot hold one request's reservation: reservation 'max' reserves "
     "max_len = 2048 slots per request, so the simulation would wait forever; allowed: >= 2048", 2048),
    (mem("oracle", kv_budget_tokens=60), CAPPED, "allowed: >= 70", 70),  # 40 + 30 tokens at most
    (mem("oracle", kv_budget_tokens=60, max_len=64), CAPPED, "up to 64 tokens (max_len)", 64),
    (mem("pow2", kv_budget_tokens=71), CAPPED, "up to 72 slots (output 30 -> 32)", 72),  # 40 + 32
    (mem("paged", kv_budget_tokens=64), CAPPED,  # 70 tokens = 5 blocks of 16
     "runs[0].kv_budget_tokens: 64 cannot hold one request: a request can have prompt + output up to 70 "
     "tokens (workload.max_prompt_len 40 + workload.max_output_len 30), i.e. 5 blocks of block_size 16, "
     "above the watermark (0.01 of the blocks)", 80),
    (mem("paged", kv_budget_tokens=128, watermark=0.5), CAPPED, "allowed: >= 144", 144),  # 9 blocks, 5 free
    (mem("oracle", kv_budget_tokens=4096, max_len=64), {**CAPPED, "kind": "fixed"},
     "runs[0].max_len: 64 is below every request of the fixed workload: 70 tokens", None),
], ids=["max", "oracle-caps", "oracle-max_len", "pow2", "paged", "paged-watermark", "fixed-above-max_len"])
def test_memory_sim_budget_below_one_reservation(run, workload, expected, smallest_ok):
    rejects(config(run, workload=workload), expected)
    if smallest_ok is not None:  # the smallest allowed budget loads
        parse_config(config({**run, "kv_budget_tokens": smallest_ok}, workload=workload))


# 2 ------------------------------------------------------------------------------------------------
def claim(run, metric, ratio_to=None):
    return {"claim": "c", "source": "s", "paper": 1.0, "unit": "x", "run": run, "metric": metric,
            "ratio_to": ratio_to}


SIM = [mem("paged", kv_budget_tokens=4096)]
SERVING = [cont(), {"name": "s", "engine": "static"}]
BENCH = [{"name": "b", "engine": "attention_bench", "backend": "contiguous", "context_len": 8}]


@pytest.mark.parametrize("runs, claims, expected", [
    (SIM, [claim("m", "kv_utilisation")], "claims[0].metric: 'kv_utilisation' is not a metric of run 'm' (engine "
                                          "'memory_sim'); allowed: iterations, kv_bytes_allocated_peak"),
    (SERVING, [claim("c", "decode_tokens_per_s", ratio_to="s")],
     "claims[0].metric: 'decode_tokens_per_s' is not a metric of ratio_to run 's' (engine 'static'); allowed: "),
    (BENCH, [claim("b", "device")], "claims[0].metric: 'device' is not a metric of run 'b' (engine "
                                    "'attention_bench')"),  # text: a claim divides numbers
    (SERVING, [claim("s", "compile_s")], "claims[0].metric: 'compile_s' is not a metric of run 's'"),
    (SIM, [claim("m", "kv_utilization"), claim("zz", "kv_utilization")], "claims[1].run: unknown run 'zz'; "
                                                                         "allowed: ['m']"),
], ids=["typo", "ratio_to-engine", "text", "unknown", "unknown-run"])
def test_claim_metrics_are_checked_against_the_runs_engines(runs, claims, expected):
    rejects(config(*runs, claims=claims), expected)
    parse_config(config(*SIM, claims=[claim("m", "kv_utilization")]))
    parse_config(config(*SERVING, claims=[claim("c", "output_tokens_per_s", ratio_to="s")]))


# 3 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine_run", [
    mem("oracle", kv_budget_tokens=4096),
    {"name": "m", "engine": "sharing_sim", "mode": "parallel_sampling", "width": 2},
    {"name": "m", "engine": "attention_bench", "backend": "contiguous", "context_len": 8},
    {"name": "m", "engine": "gemm_roofline"},
])
def test_rate_sweep_only_over_serving_engines(engine_run):
    assert SWEEP_ENGINES == ("static", "hf", "continuous", "llama-cpp")
    rejects(config(engine_run, request_rates=[1, 2]),
            f"runs[0].engine: run 'm' (engine {engine_run['engine']!r}) cannot be swept over request_rates: it "
            "serves no requests on a clock; allowed engines in a sweep: static, hf, continuous, llama-cpp")
    parse_config(config(cont(), {"name": "s", "engine": "static"}, request_rates=[1, 2]))


def test_one_report_kind_per_experiment():
    """experiments/report.py draws one kind of table and plot per experiment: mixing kinds would fail
    after every run had finished."""
    rejects(config(cont(), mem("max", kv_budget_tokens=4096)),
            "runs[1].engine: 'memory_sim' (run 'm') cannot share an experiment with 'continuous' (runs[0]): the "
            "results table and plot are one kind per experiment; allowed beside 'continuous': static, hf, "
            "continuous, llama-cpp, gemm_roofline")
    parse_config(config(cont(), {"name": "r", "engine": "gemm_roofline"}, {"name": "l", "engine": "llama-cpp"}))


def test_report_groups_match_the_report_kinds():
    """Each group's runs, with the metrics the registry lists, get one table kind whose first column
    they all report; a run of another group does not."""
    from experiments.config_checks import REPORT_GROUPS
    from experiments.metric_names import METRICS
    from experiments.tables import _TABLES, _table_kind

    def runs(*engines):
        return [{"name": e, "config": {"engine": e}, "metrics": dict.fromkeys(METRICS[e], 1.0)} for e in engines]

    for group in REPORT_GROUPS:
        assert _table_kind(runs(*group)) in _TABLES
        for other in REPORT_GROUPS:
            if other is not group:
                mixed = runs(group[0], other[0])
                columns = [key for key, _, _ in _TABLES[_table_kind(mixed)][0] if not key.startswith("config.")]
                assert any(not all(key in run["metrics"] for key in columns) for run in mixed), (group, other)


# 4 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run", [
    cont(name="r", backend="paged", block_size=12, num_blocks=100),
    {"name": "r", "engine": "attention_bench", "backend": "paged", "block_size": 12, "context_len": 8},
])
def test_pallas_backend_needs_power_of_two_blocks(run):
    rejects(config(run), "runs[0].block_size: backend 'paged' (the Pallas kernels", "needs a power of two",
            "allowed: 1, 2, 4, 8, 16, 32, 64, 128, 256, ... (got 12)")
    parse_config(config({**run, "block_size": 8, "backend": "paged_reference"}))  # references take any size
    parse_config(config({**run, "block_size": 8}))


# 5 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run, expected", [
    (cont(preemption="swap"), "runs[0].num_cpu_blocks: EngineConfig.num_cpu_blocks must be > 0 when preemption "
                              "is 'swap'"),
    (cont(num_blocks=4, max_model_len=100), "runs[0].num_blocks: 4 blocks of 16 tokens cannot hold one request of "
                                            "100 tokens (max_model_len); allowed: >= 7"),
    (cont(num_blocks=4), "runs[0].num_blocks: 4 blocks of 16 tokens cannot hold one request of 80 tokens (unset "
                         "max_model_len: the workload's longest request, up to 70 tokens, in whole blocks)"),
    (cont(max_model_len=64), "runs[0].max_model_len: 64 is below the workload's longest request: up to 70 tokens"),
])
def test_kv_cache_holds_a_request_and_swap_has_space(run, expected):
    rejects(config(run, workload=CAPPED), expected)
    parse_config(config(cont(num_blocks=5, preemption="swap", num_cpu_blocks=1), workload=CAPPED))


# 6 ------------------------------------------------------------------------------------------------
def test_negative_seeds_name_the_key():
    rejects(config(cont(), workload={**WORKLOAD, "seed": -1}),
            "workload.seed: Input should be greater than or equal to 0 (got -1)")
    rejects(config({"name": "p", "engine": "sharing_sim", "mode": "parallel_sampling", "width": 2, "seed": -3}),
            "runs[0].seed: Input should be greater than or equal to 0 (got -3)")


def test_engine_settings_of_the_continuous_run_name_their_values():
    """`kernels` and `kv_cache_dtype` are EngineConfig's, checked against the same name lists."""
    rejects(config(cont(kernels="fused")), "runs[0].kernels", "'xla'")
    rejects(config(cont(kv_cache_dtype="int3")), "runs[0].kv_cache_dtype", "'bfloat16'")
    parse_config(config(cont(kernels="xla", kv_cache_dtype="bfloat16")))


def test_engine_settings_given_one_by_one_follow_the_engine_rules():
    """`admission`, `kv_memory`, `chunked_prefill` beside or instead of a policy: EngineConfig's own
    checks, named by the YAML field."""
    rejects(config(cont(policy="static", admission="iteration")), "runs[0].admission", "under policy 'static'")
    rejects(config(cont(admission="batch", chunked_prefill=True)), "runs[0].chunked_prefill", "batch admission")
    rejects(config(cont(kv_memory="contiguous")), "runs[0].kv_memory", "'paged'")
    parse_config(config(cont(admission="batch", kv_memory="paged", enable_prefix_caching=True)))


# 7 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, expected", [
    (config(cont(policy="continuous", reservation="max")),
     "runs[0].reservation: applies only under policy 'request_level'; this run ignores it: remove it (got 'max')"),
    (config(cont(num_cpu_blocks=4)), "runs[0].num_cpu_blocks: applies only with preemption 'swap'"),
    (config(cont(policy="request_level", preemption="swap", num_cpu_blocks=4)),
     "runs[0].preemption: applies only under policies 'continuous' and 'chunked_prefill' (policy "
     "'request_level' reserves each request's KV up front and never preempts)"),
    (config(cont(policy="static", enable_prefix_caching=True)),
     "runs[0].enable_prefix_caching: applies only on paged KV memory (policies 'continuous' and 'chunked_prefill', "
     "or kv_memory 'paged'; policy 'static' does not share blocks)"),
    (config(mem("max", kv_budget_tokens=4096, block_size=32)), "runs[0].block_size: applies only to reservation "
                                                               "'paged'"),
    (config(mem("oracle", kv_budget_tokens=4096, watermark=0.1)), "runs[0].watermark: applies only to "
                                                                  "reservation 'paged'"),
    (config({"name": "p", "engine": "sharing_sim", "mode": "parallel_sampling", "width": 2, "max_requests": 5}),
     "runs[0].max_requests: applies only to mode 'beam_search'"),
    (config({"name": "p", "engine": "sharing_sim", "mode": "beam_search", "width": 2, "seed": 1}),
     "runs[0].seed: applies only to mode 'parallel_sampling'"),
    (config({"name": "b", "engine": "attention_bench", "backend": "contiguous", "context_len": 8, "block_size": 8}),
     "runs[0].block_size: applies only to the paged backends ('paged_reference', 'paged')"),
    (config(cont(), latency_bound_s_per_token=0.5),
     "latency_bound_s_per_token: applies only to a rate sweep (set request_rates too, or remove it)"),
    (config(cont(), workload={**WORKLOAD, "request_rate": 4}, request_rates=[1, 2]),
     "workload.request_rate: a rate sweep replaces it by each of request_rates; remove it"),
    (config(cont(), check_same_outputs=True, request_rates=[1, 2]), "check_same_outputs: a rate sweep does not "
                                                                    "compare outputs"),
    (config(cont(), claims=[claim("c", "output_tokens_per_s")], request_rates=[1, 2]),
     "claims: claims are not evaluated in a rate sweep"),
    (config(cont(), model="weights/model.gguf", random_weights=True), "random_weights: applies to a model preset"),
])
def test_keys_a_run_would_ignore_are_errors(data, expected):
    rejects(data, expected)


def test_keys_left_at_their_defaults_are_not_flagged():
    """Only keys set in the YAML count (pydantic's model_fields_set), not the defaults they share."""
    for run in (cont(policy="static"), mem("max", kv_budget_tokens=4096),
                {"name": "p", "engine": "sharing_sim", "mode": "parallel_sampling", "width": 2},
                {"name": "b", "engine": "attention_bench", "backend": "contiguous", "context_len": 8}):
        parse_config(config(run))


def test_every_problem_is_listed_at_once():
    message = rejects(config(cont(num_blocks=1, reservation="pow2"), workload=CAPPED),
                      "runs[0].reservation:", "runs[0].num_blocks:")
    assert message.count("\n  ") == 2


# 8 ------------------------------------------------------------------------------------------------
def test_stop_token_ids_outside_the_vocabulary():
    from continuous_batching.engine import Engine
    from continuous_batching.engine_config import EngineConfig
    from continuous_batching.sampling_params import SamplingParams
    from models.config import PRESETS

    tiny = PRESETS["tiny"]  # vocab_size 263
    with pytest.raises(ValueError, match=r"SamplingParams.stop_token_ids must be token ids in \[0, 263\) \(the "
                                         r"model's vocabulary\), got \[263\] outside it"):
        SamplingParams(stop_token_ids=(5, 263)).check_vocab(tiny.vocab_size)
    SamplingParams(stop_token_ids=(0, 262)).check_vocab(tiny.vocab_size)
    engine = Engine.__new__(Engine)  # add_request checks before touching the scheduler or the model's weights
    engine.model, engine.config = SimpleNamespace(config=tiny, tokenizer=None), EngineConfig(max_model_len=64)
    with pytest.raises(ValueError, match=r"stop_token_ids must be token ids in \[0, 263\)"):
        engine.add_request([5, 6], {"stop_token_ids": [1000]})


# 9 ------------------------------------------------------------------------------------------------
def test_max_model_len_beyond_the_model():
    from continuous_batching.engine import Engine
    from continuous_batching.engine_config import EngineConfig
    from models.config import PRESETS

    tiny = PRESETS["tiny"]  # max_position_embeddings 512
    with pytest.raises(ValueError, match=r"EngineConfig.max_model_len \(1024\) must be <= the model's "
                                         r"max_position_embeddings \(tiny: 512\)"):
        Engine(SimpleNamespace(config=tiny, tokenizer=None), EngineConfig(max_model_len=1024))

    assert read_model_config("tiny") is tiny and read_model_config("no/such/model") is None
    data = config(cont(max_model_len=1024, num_blocks=128), model="tiny")
    with pytest.raises(ConfigError, match=r"invalid experiment config x.yaml for model 'tiny':\n  runs\[0\]"
                                          r".max_model_len: 1024 exceeds the model's max_position_embeddings "
                                          r"\(tiny: 512\); allowed: 1..512"):
        check_against_model(parse_config(data), tiny, source="x.yaml")
    long_requests = {**CAPPED, "max_prompt_len": 500}  # up to 530 tokens
    with pytest.raises(ConfigError, match=r"runs\[0\].max_model_len: unset, so the workload's longest request: "
                                          r"up to 530 tokens"):
        check_against_model(parse_config(config(cont(), workload=long_requests)), tiny)
    beam = {"name": "b", "engine": "sharing_sim", "mode": "beam_search", "width": 2}
    with pytest.raises(ConfigError, match=r"runs\[0\].mode: beam_search runs the model on requests of up to 530"):
        check_against_model(parse_config(config(beam, workload=long_requests)), tiny)
    check_against_model(parse_config(config(cont(max_model_len=512), model="tiny")), tiny)
    check_against_model(parse_config(data), None)  # an unreadable model config checks nothing
