"""The HF `generate` baseline runs at transformers' defaults and, on the same weights, gives the same
greedy tokens as our engines (EOS is an ordinary token for both)."""

from __future__ import annotations

import dataclasses

import models
from experiments.config import HFRunConfig, StaticRunConfig
from experiments.engines import make_engine, warm_up_and_serve
from experiments.provenance import host_cores
from experiments.workloads import Request


def test_hf_baseline_uses_its_defaults_and_matches_our_tokens():
    import torch

    model = models.load("tiny")
    requests = [Request(0, (5, 6, 7), 40, 0.0), Request(1, (8,) * 11, 25, 0.0), Request(2, (9, 4), 33, 0.0)]
    # make a token that greedy decoding of request 0 emits the EOS: HF must neither stop at it nor mask it
    eos = models.generate(model, [[5, 6, 7]], max_new_tokens=3, ignore_eos=True)[0][2]
    model = dataclasses.replace(model, config=model.config.replace(eos_token_ids=(eos,)))
    hf = make_engine(model, HFRunConfig(name="hf", engine="hf", batch_size=2), requests)
    trace = warm_up_and_serve(hf, requests, "hf", warmup="untimed_pass")
    assert trace.extra_metrics["attn_implementation"] == "sdpa" and torch.get_num_threads() == host_cores()
    ours = make_engine(model, StaticRunConfig(name="s", engine="static", batch_size=2), requests)
    warm_up_and_serve(ours, requests, "s", warmup="untimed_pass")
    assert eos in ours.outputs[0]
    assert hf.outputs == ours.outputs and [len(hf.outputs[i]) for i in range(3)] == [40, 25, 33]
