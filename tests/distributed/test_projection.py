"""The paper-scale projection (distributed/projection.py): Llama 2 parameter counts, per-device
weight and KV bytes under tp / pp splits, Megatron all-reduce volume, and the smallest layout that
fits a GPU. Pure arithmetic: no JAX, no devices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distributed.projection import (
    GPUS, LLAMA2, RECOMMENDATIONS, ModelShape, allreduce_bytes_per_token, allreduce_seconds_per_token,
    kv_bytes_per_token_per_device, num_allreduces_per_token, projection_rows, ring_allreduce_traffic,
    smallest_fit, weight_bytes_per_device)

ROOT = Path(__file__).resolve().parents[2]
A100, H100 = GPUS["A100-80GB"], GPUS["H100-80GB"]
L7, L13, L70 = LLAMA2["llama-2-7b"], LLAMA2["llama-2-13b"], LLAMA2["llama-2-70b"]


@pytest.mark.parametrize("model, published", [(L7, 6.74e9), (L13, 13.0e9), (L70, 68.98e9)])
def test_param_counts_match_published(model, published):
    assert model.num_params == pytest.approx(published, rel=0.01)


def test_tp1_pp1_holds_every_param():
    assert weight_bytes_per_device(L7, 1, 1) == 2 * L7.num_params
    assert weight_bytes_per_device(L7, 1, 1, bytes_per_param=1) == L7.num_params


def _norm_bytes(model: ModelShape) -> int:
    return 2 * (2 * model.num_layers + 1) * model.hidden_size  # replicated on every tp device


@pytest.mark.parametrize("model", [L7, L13, L70])
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_weights_shrink_as_one_over_tp_except_norms(model, tp):
    sharded = 2 * model.num_params - _norm_bytes(model)
    assert weight_bytes_per_device(model, tp, 1) == sharded // tp + _norm_bytes(model)


def test_kv_projections_replicate_past_num_kv_heads():
    ideal = (2 * L70.num_params - _norm_bytes(L70)) / 16 + _norm_bytes(L70)
    assert weight_bytes_per_device(L70, 16, 1) > ideal  # 8 KV heads over 16 devices: one each
    per_token = [kv_bytes_per_token_per_device(L70, tp, 1) for tp in (1, 2, 4, 8, 16)]
    assert per_token[:4] == [per_token[0] / tp for tp in (1, 2, 4, 8)]
    assert per_token[4] == per_token[3] == 2 * 80 * 1 * 128 * 2  # stops falling past tp 8


def test_kv_bytes_per_token_split_by_pipeline_stage():
    assert kv_bytes_per_token_per_device(L7, 1, 1) == 2 * 32 * 32 * 128 * 2
    assert kv_bytes_per_token_per_device(L7, 1, 2) == kv_bytes_per_token_per_device(L7, 1, 1) / 2
    assert kv_bytes_per_token_per_device(L7, 1, 3) == 2 * 11 * 32 * 128 * 2  # 11 + 11 + 10 layers


def test_pipeline_counts_the_largest_stage():
    h, vocab = L7.hidden_size, L7.vocab_size
    layer = (L7.num_params - 2 * vocab * h - h) // L7.num_layers
    # 16 layers per stage; the last stage's LM head + final norm outweighs the first's embedding by h
    assert weight_bytes_per_device(L7, 1, 2) == 2 * (16 * layer + vocab * h + h)


def test_allreduce_volume():
    for model in (L7, L13, L70):
        assert allreduce_bytes_per_token(model, 1) == 0
        assert allreduce_seconds_per_token(model, 1, A100) == 0
        assert num_allreduces_per_token(model, 1) == 0
        for tp in (2, 4, 8):
            assert num_allreduces_per_token(model, tp) == 2 * model.num_layers
            assert allreduce_bytes_per_token(model, tp) == 2 * model.num_layers * model.hidden_size * 2
    assert ring_allreduce_traffic(1000.0, 1) == 0
    assert ring_allreduce_traffic(1000.0, 2) == 1000.0
    assert ring_allreduce_traffic(1000.0, 8) == pytest.approx(1750.0)
    seconds = allreduce_seconds_per_token(L70, 8, A100)
    assert seconds == pytest.approx(1.75 * 2 * 80 * 8192 * 2 / 300e9)
    assert allreduce_seconds_per_token(L70, 8, H100) < seconds


def test_smallest_fit():
    assert smallest_fit(L7, A100, kv_tokens=4096) == (1, 1)
    assert smallest_fit(L70, A100, kv_tokens=0) == (2, 1)  # ~128 GiB of fp16 weights
    assert smallest_fit(L70, A100, kv_tokens=0, bytes_per_param=0.5) == (1, 1)  # 4-bit weights
    tp8_room = 0.9 * A100.memory_bytes - weight_bytes_per_device(L70, 8, 1)
    tokens = int(tp8_room / kv_bytes_per_token_per_device(L70, 8, 1)) + 1
    assert smallest_fit(L70, A100, kv_tokens=tokens) == (8, 2)  # tp 8 full: pipeline stages next


def test_smallest_fit_skips_tp_not_dividing_heads():
    twelve_heads = ModelShape("twelve-heads", 32, 6144, 16384, 12, 12, 512, 32000)
    assert smallest_fit(twelve_heads, A100, kv_tokens=400_000) == (4, 2)  # never tp 8: 12 % 8 != 0


def test_impossible_fit_names_the_model():
    with pytest.raises(ValueError, match="llama-2-70b.*GiB"):
        smallest_fit(L70, A100, kv_tokens=10**9)


def test_projection_rows():
    rows = projection_rows()
    assert [(r["model"], r["gpu"]) for r in rows] == [(m, g) for m in LLAMA2 for g in GPUS]
    for row in rows:
        budget = 0.9 * GPUS[row["gpu"]].memory_bytes / 2**30
        assert row["weights_gib_per_device"] + row["kv_gib_per_device"] <= budget
        assert row["recommended"] and (row["recommended"] == "no recommendation found"
                                       or row["recommended_url"].startswith("https://"))
    by_key = {(r["model"], r["gpu"]): r for r in rows}
    for model in LLAMA2:
        a100, h100 = by_key[model, "A100-80GB"], by_key[model, "H100-80GB"]
        assert h100["hbm_decode_step_ms_lower_bound"] < a100["hbm_decode_step_ms_lower_bound"]
    assert set(RECOMMENDATIONS) <= set(LLAMA2)


def test_imports_no_jax():
    code = "import sys, distributed.projection; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
