"""The kernel-fusion benchmark (experiments/fusion_bench.py): its evidence on the test model (one
program per op when unfused, one per layer when compiled, Pallas kernels counted, the same layer
output as the xla set), its bytes-per-op model (fusion_bytes.py) by hand, and its config checks."""

from __future__ import annotations

import pytest

import models
from experiments.config import ConfigError, FusionBenchRunConfig, load_config
from experiments.fusion_bench import FusionBenchEngine
from experiments.fusion_bytes import op_bytes
from models.config import ModelConfig


def _serve(model, **keys):
    run = FusionBenchRunConfig(name="r", engine="fusion_bench", iterations=2, **keys)
    return FusionBenchEngine(model, run, []).serve([], lambda n: None).extra_metrics


@pytest.mark.parametrize("kernels, fuse_weights", [("unfused", False), ("xla", False), ("xla", True), ("pallas", False)])
def test_each_ops_set_gives_the_xla_layer_and_its_evidence(tiny_model, kernels, fuse_weights):
    m = _serve(tiny_model, kernels=kernels, fuse_weights=fuse_weights, phase="decode", batch_size=3, context_len=21)
    assert m["num_tokens"] == 3 and m["layer_max_abs_diff"] < 1e-5
    # unfused: every op (and the model's one reshape between them) its own dispatch; compiled: one
    assert (m["programs_per_layer"] > 10) == (kernels == "unfused")
    # pallas: add + RMSNorm twice, QKV + RoPE + cache write, SwiGLU
    assert m["pallas_kernels_per_layer"] == (4 if kernels == "pallas" else 0)
    assert (m["xla_fusions_per_layer"] is not None) == (kernels == "xla")
    timed = kernels != "pallas"  # interpreted off a GPU: not timed
    assert all((m[f"{op}_us"] is not None) == timed for op in ("add_rms_norm", "self_attention", "layer"))
    assert (m["step_ms"] is not None) == timed


def test_prefill_counts_the_prompt_tokens(tiny_model):
    m = _serve(tiny_model, kernels="xla", phase="prefill", prompt_len=19)
    assert m["num_tokens"] == 19 and m["layer_max_abs_diff"] == 0.0
    assert m["swiglu_mlp_bytes_unfused"] > m["swiglu_mlp_bytes"]


def test_bytes_per_op_by_hand():
    config = ModelConfig(name="c", vocab_size=8, hidden_size=4, intermediate_size=6, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=2)
    fused, unfused = op_bytes(config, num_tokens=3, context_tokens=10, itemsize=4)
    # T=3, d=4, Q=4, V=2, I=6, C=10
    assert fused["add_rms_norm"] == (4 * 3 * 4 + 4) * 4 and unfused["add_rms_norm"] == (5 * 3 * 4 + 4) * 4
    tables = 2 * 3 * 2 * 4
    assert fused["qkv_rope"] == (3 * 4 + 4 * 8 + 3 * 8) * 4 + tables
    assert unfused["qkv_rope"] == (3 * 3 * 4 + 4 * 8 + 3 * 8 + 2 * 3 * 6) * 4 + tables
    assert fused["attention"] == unfused["attention"] == (2 * 3 * 4 + 4 * 3 * 2 + 2 * 10 * 2) * 4
    assert fused["swiglu_mlp"] == (2 * 3 * 4 + 3 * 4 * 6 + 2 * 3 * 6) * 4
    # x read by both matmuls; gate and up written and read back; the activation the same in both
    assert unfused["swiglu_mlp"] - fused["swiglu_mlp"] == (3 * 4 + 4 * 3 * 6) * 4
    assert unfused["self_attention"] > fused["self_attention"]


@pytest.mark.parametrize("run, field, message", [
    ({"kernels": "pallas", "phase": "decode", "fuse_weights": True}, "fuse_weights", "applies to kernels 'xla' only"),
    ({"kernels": "xla", "phase": "prefill", "batch_size": 4}, "batch_size", "phase 'decode'"),
    ({"kernels": "xla", "phase": "decode", "prompt_len": 64}, "prompt_len", "phase 'prefill'"),
    ({"kernels": "xla", "phase": "decode", "context_len": 4000}, "context_len", "allowed: <= 1280"),
])
def test_config_errors_name_the_key(tmp_path, run, field, message):
    path = tmp_path / "c.yaml"
    path.write_text(f"experiment: x\nmodel: tiny\nworkload: {{kind: fixed, num_requests: 1, max_prompt_len: 8, max_output_len: 4}}\n"
                    f"runs:\n  - {{name: r, engine: fusion_bench, {', '.join(f'{k}: {str(v).lower()}' for k, v in run.items())}}}\n")
    with pytest.raises(ConfigError, match=f"runs\\[0\\].{field}.*{message}"):
        load_config(path)
