"""Write the notebooks from the cell sources below and execute them, so the committed .ipynb files
show their outputs and plots to a reader who does not run them (one command, from the repository
root: `python notebooks/build_notebooks.py`; `--no-execute` writes the cells only).

Keeping the sources here makes notebook diffs readable; tests/test_notebooks.py checks the committed
cells match these sources and executes the notebooks again, so a notebook that stops working fails CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

PAGED_ATTENTION = [
    ("md", """# PagedAttention, step by step

vLLM stores each sequence's KV cache in fixed-size **blocks** anywhere in one pool, found through a
per-sequence **block table**. This notebook walks through the block manager, shows why it wastes
almost no memory, and checks that the model running on pages gives exactly the naive cache's tokens.
Everything runs on CPU in a few seconds (the Pallas kernels in interpret mode)."""),
    ("code", """import numpy as np
import jax.numpy as jnp
import models
from paged_attention.block_manager import BlockManager"""),
    ("md", """## 1. Blocks, slots, copy-on-write
Block size 4, eight blocks. A 6-token prompt takes two blocks; the token at position `p` lives in
slot `table[p // 4] * 4 + p % 4`. Forking the sequence (parallel sampling) shares both blocks; the
first writer to the shared, half-full last block gets a private copy."""),
    ("code", """bm = BlockManager(num_blocks=8, block_size=4)
bm.allocate(0, [11, 12, 13, 14, 15, 16])
print("table of seq 0:", bm.get_block_table(0), " slot of position 5:", bm.get_slot(0, 5))
bm.fork(0, 1)
print("after fork, ref counts:", [bm.ref_count(b) for b in bm.get_block_table(0)])
slot, copies = bm.append_slot(1, [11, 12, 13, 14, 15, 16, 17])  # its tokens, the new one last
print("seq 1 appends -> slot", slot, "copy-on-write", copies, "-> table", bm.get_block_table(1))
slot, copies = bm.append_slot(0, [11, 12, 13, 14, 15, 16, 18])
print("seq 0 appends -> slot", slot, "copies", copies, "(it is the last owner now)")
bm.free(0); bm.free(1)
print("all freed:", bm.num_free_blocks == 8)"""),
    ("md", """## 2. Prefix caching
With `enable_prefix_caching`, every full block is keyed by a hash of (parent hash, its tokens). A
second request with the same prefix reuses the blocks instead of recomputing them; freed cached
blocks stay findable until the pool needs them (LRU)."""),
    ("code", """bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
system_prompt = list(range(100, 108))          # two full blocks
print("cached tokens, 1st request:", bm.allocate(0, system_prompt + [1, 2, 3]))
print("cached tokens, 2nd request:", bm.allocate(1, system_prompt + [4, 5]))
print("hits / misses:", bm.prefix_hits, bm.prefix_misses, " shared blocks:", bm.get_block_table(0)[:2] == bm.get_block_table(1)[:2])"""),
    ("md", """## 3. Why it matters: KV memory holding real tokens
The vLLM paper's Fig. 2 in miniature, on Alpaca-like lengths so the
notebook needs no tokenizer: Orca reserves memory per request (the maximum length, a power of two,
or the exact length if it knew it), paged allocates a block at a time. `experiments/configs/paged_memory.yaml`
runs the full-size version."""),
    ("code", """from experiments.config import WorkloadConfig, MemorySimRunConfig
from experiments.workloads import build_workload
from experiments.memory_sim import MemorySimEngine
from experiments.metrics import summarize

tiny = models.load("tiny")
requests = build_workload(WorkloadConfig(kind="alpaca", num_requests=600, seed=0), vocab_size=tiny.config.vocab_size)
rows = {}
for policy in ["max", "pow2", "oracle", "paged"]:
    cfg = MemorySimRunConfig(name=policy, engine="memory_sim", reservation=policy, kv_budget_tokens=4096, max_len=512)
    m = summarize(MemorySimEngine(tiny, cfg, requests).serve(requests, lambda n: None))
    rows[policy] = m
    print(f"{policy:7s} KV holding real tokens {m['kv_utilization']:6.1%}   requests batched {m['mean_batched_requests']:6.1f}")
assert rows["paged"]["kv_utilization"] > rows["oracle"]["kv_utilization"] > rows["max"]["kv_utilization"]"""),
    ("code", """import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(5, 3))
ax.bar(list(rows), [100 * r["kv_utilization"] for r in rows.values()], color="tab:green")
ax.set_ylabel("% of KV memory holding tokens"); ax.set_ylim(0, 100)
plt.show()"""),
    ("md", """## 4. The model on pages gives the naive cache's tokens
Prefill three prompts of different lengths in one ragged step, then decode one token per sequence
per step through the Pallas decode kernel (interpreted on CPU). Unused cache slots hold NaN: a leak
would show at once."""),
    ("code", """import functools, jax
from models.llama import forward
from paged_attention.kv_cache import init_paged_kv_cache
from paged_attention.metadata import PagedMetadata

cfg = tiny.config                                # head_dim 14: the kernels pad it to 16 inside
model = models.Model(cfg, models.init_params(cfg, seed=1, std=0.2))  # std 0.2: clear argmaxes
prompts = [[5, 9, 14, 3, 7], [8, 1, 22, 17, 40, 41, 99, 12, 6], [30, 31]]
naive = models.generate(model, prompts, max_new_tokens=6, ignore_eos=True)

block_size, manager = 4, BlockManager(num_blocks=32, block_size=4)
cache = [(jnp.full_like(k, jnp.nan), jnp.full_like(v, jnp.nan))
         for k, v in init_paged_kv_cache(cfg.num_layers, 32, block_size, cfg.num_kv_heads, cfg.head_dim)]
step = jax.jit(functools.partial(forward, config=cfg, backend="paged"))
for i, p in enumerate(prompts):
    manager.allocate(i, p)
lens = [len(p) for p in prompts]
md = PagedMetadata.build([manager.get_block_table(i) for i in range(3)], lens, lens, block_size, max_blocks=8)
tokens = jnp.asarray(np.concatenate(prompts), jnp.int32)
positions = jnp.asarray(np.concatenate([np.arange(n) for n in lens]), jnp.int32)
logits, cache = step(model.params, tokens, positions, cache, md, logits_indices=md.query_start_loc[1:] - 1)
paged = [[int(t)] for t in np.asarray(logits).argmax(-1)]
for _ in range(5):
    for i in range(3):
        manager.append_slot(i, prompts[i] + paged[i])
    ctx = [manager.num_tokens(i) for i in range(3)]
    md = PagedMetadata.build([manager.get_block_table(i) for i in range(3)], ctx, [1, 1, 1], block_size, max_blocks=8)
    logits, cache = step(model.params, jnp.asarray([o[-1] for o in paged], jnp.int32), jnp.asarray(ctx, jnp.int32) - 1, cache, md)
    for i, t in enumerate(np.asarray(logits).argmax(-1)):
        paged[i].append(int(t))
print("naive:", naive)
print("paged:", paged)
assert paged == naive"""),
]

CONTINUOUS_BATCHING = [
    ("md", """# Continuous batching, step by step

Orca's idea: schedule every **iteration**, not every request. A request joins the running batch as
soon as memory allows and leaves the moment it finishes, instead of waiting for a whole static batch.
This notebook drives `continuous_batching.Engine` on a tiny seeded model (CPU, seconds): the request
API, the four scheduling policies on one workload, preemption under a tiny KV budget, and chunked
prefill's token budget. Every policy must give each request exactly the same greedy tokens."""),
    ("code", """import numpy as np
import jax.numpy as jnp
import models
from models.config import PRESETS
from models.llama import init_params
from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig, POLICIES
from continuous_batching.sampling_params import SamplingParams

config = PRESETS["tiny"]
model = models.Model(config, init_params(config, seed=0, dtype=jnp.float32, std=0.15))
rng = np.random.default_rng(0)
prompts = [rng.integers(3, config.vocab_size, int(rng.integers(2, 40))).tolist() for _ in range(24)]
lengths = [int(rng.integers(2, 30)) for _ in prompts]
params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
small = dict(num_blocks=48, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=80)"""),
    ("md", """## 1. The request API
`add_request` queues a prompt with its `SamplingParams`; each `step()` runs one model iteration and
returns a `RequestOutput` for every request that got a token. Bad parameters are refused at
`add_request` with the field named, and the engine keeps serving the others."""),
    ("code", """engine = Engine(model, EngineConfig(**small))
a = engine.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
b = engine.add_request(prompts[1], SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=5, logprobs=2))
try:
    engine.add_request(prompts[2], {"temperature": -1})
except ValueError as err:
    print("refused:", err)
while engine.has_unfinished():
    for out in engine.step():
        o = out.outputs[0]
        print(f"step {engine.num_steps}: request {out.request_id} +{o.new_token_ids} finished={out.finished}",
              "" if o.logprobs is None else f"logprob {o.logprobs[-1][0]:.2f}")"""),
    ("md", """## 2. Four policies, one workload
`static` (FasterTransformer) admits a batch only when the previous one is done and reserves
`max_model_len` per request; `request_level` (Orca) admits every step but reserves a contiguous
region per request; `continuous` (vLLM) admits every step on paged blocks; `chunked_prefill`
(Sarathi / Dynamic SplitFuse) also splits prompts to fill a per-step token budget. Fewer model
steps and more sequences per step mean more throughput for the same work."""),
    ("code", """results = {}
for policy in POLICIES:
    engine = Engine(model, EngineConfig(policy=policy, reservation="oracle", **small))
    outs = engine.generate(prompts, params, progress=False)
    results[policy] = [o.outputs[0].token_ids for o in outs]
    print(f"{policy:16s} steps {engine.num_steps:4d}  mean seqs/step "
          f"{engine.stats.scheduled_seqs / engine.num_steps:5.2f}  preemptions {engine.scheduler.num_preemptions}")
reference = results["static"]
assert all(tokens == reference for tokens in results.values()), "batch invariance broken"
print("every policy produced identical tokens for every request")"""),
    ("md", """## 3. Preemption when blocks run out
With 20 blocks of 4 tokens the running sequences outgrow the cache. The newest is preempted: by
**recompute** (its blocks freed, its prompt + output prefilled again later) or by **swap** (its
blocks copied to a CPU pool and back; recompute again when the CPU pool is full). Either way no
request is lost and no token changes; swapping recomputes fewer tokens."""),
    ("code", """for mode in ("recompute", "swap"):
    engine = Engine(model, EngineConfig(num_blocks=20, block_size=4, max_num_seqs=8, max_model_len=80,
                                        preemption=mode, num_cpu_blocks=40))
    outs = engine.generate(prompts, params, progress=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    print(f"{mode:9s}: {engine.scheduler.num_preemptions} preemptions, {engine.num_steps} steps, "
          f"{engine.stats.prefill_tokens} prompt/recompute tokens, outputs unchanged")"""),
    ("md", """## 4. Chunked prefill: one token budget for prompts and decodes
A 60-token prompt arrives while 4 sequences decode. Without chunking it needs a 64-token step on its
own budget; with a 16-token budget it is split into chunks that ride along with the decodes, so the
running requests keep getting a token every step (lower tail latency)."""),
    ("code", """engine = Engine(model, EngineConfig(policy="chunked_prefill", num_blocks=64, block_size=4, max_num_seqs=8,
                                    max_num_batched_tokens=16, max_model_len=96))
for p in prompts[:4]:
    engine.add_request(p[:6], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
for _ in range(3):  # 4 prompts of 6 tokens: 16 + 8 tokens, then decodes
    engine.step()
engine.add_request(list(range(5, 65)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
for _ in range(5):
    engine.step()
    chunks = [(s.seq_id, s.num_new_tokens) for s in engine.stats.last_plan.seqs]
    print(f"step {engine.num_steps}: (seq, new tokens) {chunks}  total {engine.stats.last_plan.num_tokens} <= 16")
    assert engine.stats.last_plan.num_tokens <= 16
print("compiled step programs in this process:", engine.num_compilations)"""),
]


KERNEL_FUSION = [
    ("md", """# Kernel fusion: each fused kernel beside its reference, three ops sets, and what fusion buys

FasterTransformer, TensorRT-LLM and DeepSpeed-Inference fuse the cheap ops around the matmuls, and
vLLM ships fused RMSNorm, SiLU-and-mul, RoPE and cache-write kernels. This notebook checks each of
our Pallas kernels (`kernel_fusion/`) against its pure-jnp reference (interpreted on CPU: a check,
not a speed), switches the model between the `unfused`, `xla` and `pallas` ops sets, counts the
bytes each op moves, and reads the measured per-op table from the committed results file
(`python -m experiments.run experiments/configs/fusion.yaml`)."""),
    ("code", """import json
import jax
import jax.numpy as jnp
import numpy as np
import models
from kernel_fusion.rms_norm import fused_add_rms_norm, fused_add_rms_norm_reference
from kernel_fusion.swiglu import fused_swiglu, fused_swiglu_reference
from kernel_fusion.qkv_rope import fused_qkv_rope, fused_qkv_rope_reference
from kernel_fusion.flash_attention import flash_attention, flash_attention_reference
from models.ops import rope_cos_sin

keys = iter(jax.random.split(jax.random.key(0), 16))
normal = lambda shape, scale=1.0: scale * jax.random.normal(next(keys), shape, jnp.float32)"""),
    ("md", """## 1. Each kernel beside its reference (SmolLM2's shapes: hidden 576, 9 query / 3 KV heads of 64)
Same signature, same outputs: the kernel in interpret mode runs the same program Triton would
compile, element by element on the CPU."""),
    ("code", """x, res = normal((13, 576)), normal((13, 576))
w = 1.0 + normal((576,), 0.1)
diffs = {}
a, b = fused_add_rms_norm(x, res, w, eps=1e-5, interpret=True), fused_add_rms_norm_reference(x, res, w, eps=1e-5)
diffs["add + RMSNorm"] = max(float(jnp.abs(u - v).max()) for u, v in zip(a, b))
w_gate_up = normal((576, 2 * 1536), 576 ** -0.5)
diffs["SwiGLU"] = float(jnp.abs(fused_swiglu(x, w_gate_up, interpret=True) - fused_swiglu_reference(x, w_gate_up)).max())
w_qkv = normal((576, (9 + 2 * 3) * 64), 576 ** -0.5)
cos, sin = rope_cos_sin(jnp.arange(13) + 100, 64, 10000.0)
cache = jnp.zeros((3, 8, 16, 64))
slots = jnp.arange(13, dtype=jnp.int32) * 7  # scattered slots in a pool of 8 blocks of 16
a = fused_qkv_rope(x, w_qkv, cos, sin, cache, cache, slots, num_heads=9, num_kv_heads=3, interpret=True)
b = fused_qkv_rope_reference(x, w_qkv, cos, sin, cache, cache, slots, num_heads=9, num_kv_heads=3)
diffs["QKV + RoPE + cache write"] = max(float(jnp.abs(u - v).max()) for u, v in zip(a, b))
q, k, v = normal((1, 37, 9, 64)), normal((1, 37, 3, 64)), normal((1, 37, 3, 64))
diffs["flash attention (causal GQA)"] = float(jnp.abs(flash_attention(q, k, v, interpret=True)
                                                      - flash_attention_reference(q, k, v)).max())
for name, diff in diffs.items():
    print(f"{name:30s} max |kernel - reference| = {diff:.1e}")
assert all(diff < 1e-4 for diff in diffs.values())"""),
    ("md", """## 2. Three ops sets, one key, the same tokens
`kernels` picks the ops set: `unfused` (each op its own compiled program, dispatched from Python:
the eager baseline), `xla` (the whole step one compiled program), `pallas` (the fused kernels; on a
paged cache the QKV kernel writes K and V straight into their slots). In f32 all three choose the
same greedy tokens."""),
    ("code", """from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.sampling_params import SamplingParams

model = models.load("tiny")
prompts = [[3, 1, 4, 1, 5] * k for k in (1, 2, 4)]
greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
tokens = {}
for kernels in ("unfused", "xla", "pallas"):
    engine = Engine(model, EngineConfig(num_blocks=64, block_size=4, max_model_len=64, kernels=kernels))
    tokens[kernels] = [o.outputs[0].token_ids for o in engine.generate(prompts, greedy, progress=False)]
    print(f"{kernels:8s}", tokens[kernels])
assert tokens["unfused"] == tokens["xla"] == tokens["pallas"]"""),
    ("md", """## 3. Bytes per op: why the small ops are worth fusing
From shapes alone (`experiments/fusion_bytes.py`): what each op of one SmolLM2 layer must move
fused, and what its unfused sequence moves when every intermediate goes to memory and back. At
decode the weights dominate, so fusion saves little traffic there and the win is in dispatches; at
a 512-token prefill the activations dominate and the unfused MLP moves far more than it must."""),
    ("code", """from experiments.fusion_bytes import op_bytes
from models.config import PRESETS

smollm = PRESETS["smollm2-135m"]
print(f"{'op':16s} {'decode b1 fused':>16s} {'unfused':>10s} {'prefill 512 fused':>18s} {'unfused':>10s}  (MB)")
decode, prefill = op_bytes(smollm, 1, 256, 4), op_bytes(smollm, 512, 512, 4)
for op in decode[0]:
    print(f"{op:16s} {decode[0][op] / 1e6:16.2f} {decode[1][op] / 1e6:10.2f} {prefill[0][op] / 1e6:18.2f} "
          f"{prefill[1][op] / 1e6:10.2f}")
assert all(prefill[1][op] >= prefill[0][op] for op in prefill[0])"""),
    ("md", """## 4. The measured table (from the committed results file)
Per-op and per-layer microseconds (median) for each ops set on the real model at decode 1 / 16 / 64
and prefill 512, with achieved GB/s from the bytes above; the Pallas rows carry no times on a CPU
(interpreted), only their kernel count and their difference from `xla`."""),
    ("code", """result = json.load(open("docs/results/fusion/results.json"))
ops = ("add_rms_norm", "qkv_rope", "attention", "self_attention", "o_proj", "swiglu_mlp")
fmt = lambda value, spec: "-" if value is None else format(value, spec)
print(f"{'run':28s} {'layer us':>9s} {'step ms':>8s} " + " ".join(f"{op[:12]:>12s}" for op in ops) + "   (us | GB/s)")
for run in result["runs"]:
    m = run["metrics"]
    cells = " ".join(f"{fmt(m[op + '_us'], '.0f'):>5s}|{fmt(m[op + '_gb_per_s'], '.1f'):>6s}" for op in ops)
    print(f"{run['name']:28s} {fmt(m['layer_us'], '.0f'):>9s} {fmt(m['step_ms'], '.1f'):>8s} {cells}")"""),
    ("code", """import matplotlib.pyplot as plt
from IPython.display import Image
Image("docs/results/fusion/throughput_latency.png")"""),
]


QUANTIZATION = [
    ("md", """# Quantization: llama.cpp's block formats bit-exact, weight-only int8 / int4, W8A8, GPTQ, AWQ, and what each costs

`quantization/` maps a model's params to quantized leaves and leaves the model code alone. This
notebook quantizes a real SmolLM2 weight with every llama.cpp block format (byte for byte what
llama.cpp writes), shows weight-only int8 / int4 with a ragged last group, shows why a static
per-tensor activation scale collapses where per-token scales and SmoothQuant's smoothing hold, runs
the model on quantized params, compares GPTQ and AWQ with plain rounding on a real projection, runs
the dequant-matmul kernel on the shipped Q4_1 blocks, and reads the measured table from the
committed results file (`python -m experiments.run experiments/configs/quantization.yaml`)."""),
    ("code", """import json
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import models
from models.model import find_packaged_gguf
from quantization.ggml_formats import FORMATS, dequantize_blocks, quantize_blocks
from quantization.libggml import ggml_quantize, load_libggml

reader = gguf.GGUFReader(find_packaged_gguf("smollm2-135m"))
tensor = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")  # shipped as Q4_1
shipped = np.asarray(tensor.data).reshape(-1, FORMATS["Q4_1"].type_size)
weight = dequantize_blocks(shipped, "Q4_1").reshape(576, 1536)  # GGUF rows: one output unit each
print("ffn_down:", weight.shape, "shipped as", tensor.tensor_type.name, f"{shipped.nbytes / 1e6:.2f} MB")"""),
    ("md", """## 1. Every block format, and llama.cpp's own bytes
`quantize_blocks` returns the GGUF bytes: `u8[num_blocks, type_size]`. Where `llama-cpp-python` is
installed, its `libggml-base` quantizes the same rows (through ctypes) and the bytes must be equal.
The shipped weights were written by llama.cpp as Q4_1: re-quantizing them to Q4_1 gives the shipped
blocks back, so every other format's error below is a distance from that Q4_1 base."""),
    ("code", """lib = load_libggml()
print(f"{'format':6s} {'bits/weight':>11s} {'MB':>6s} {'rms error':>10s}  bit-exact with llama.cpp")
for name, fmt in FORMATS.items():
    blocks = quantize_blocks(weight, name)
    error = np.sqrt(np.mean((dequantize_blocks(blocks, name).reshape(weight.shape) - weight) ** 2))
    exact = "not installed" if lib is None else np.array_equal(blocks, ggml_quantize(lib, weight, fmt).reshape(blocks.shape))
    print(f"{name:6s} {fmt.bits_per_weight:11.4g} {blocks.nbytes / 1e6:6.2f} {error:10.2e}  {exact}")
    assert exact in (True, "not installed")
assert np.array_equal(quantize_blocks(weight, "Q4_1"), shipped)  # the shipped blocks, byte for byte"""),
    ("md", """## 2. Weight-only int8 and int4, per channel and per group
Our params are `[in, out]`; groups run along the input rows. SmolLM2's 576 rows are 4.5 groups of
128: the last group is 64 rows with its own scale. int4 packs two codes per byte."""),
    ("code", """from quantization.weight_only import quantize_weight

gate = next(t for t in reader.tensors if t.name == "blk.3.ffn_gate.weight")  # GGUF [1536 rows of 576]
w_gate = jnp.asarray(dequantize_blocks(np.asarray(gate.data), "Q4_1").reshape(1536, 576).T)  # ours: [in 576, out 1536]
for bits, group, symmetric in ((8, 0, True), (4, 32, True), (4, 128, True), (4, 128, False)):
    q = quantize_weight(w_gate, bits, group, symmetric)
    error = float(jnp.sqrt(jnp.mean((q.dequantize() - w_gate) ** 2)))
    print(f"int{bits} group {group or 'channel':>7} {'sym' if symmetric else 'asym':4s} scales {tuple(q.scales.shape)} "
          f"codes {tuple(q.values.shape)} {q.values.dtype}  {8 * q.nbytes / w_gate.size:.2f} bits/weight  rms error {error:.2e}")"""),
    ("md", """## 3. W8A8: per-token scales hold, one static scale collapses, smoothing rescues it
Two tokens carry "massive activations" in two channels (as attention-sink tokens do). One static
per-tensor scale must cover them, leaving the ordinary tokens almost no int8 levels; per-token
scales do not care; SmoothQuant divides those channels down (and multiplies the weights up) so a
static scale works again."""),
    ("code", """from quantization.w8a8 import quantize_w8a8

rng = np.random.default_rng(0)
x = rng.standard_normal((64, 576)).astype(np.float32)
x[:2, [7, 300]] = 1000.0
x = jnp.asarray(x)
want = (x @ w_gate)[2:]
absmax = jnp.abs(x).max(0)
for label, kw in (("per-token", {}), ("per-tensor", dict(per_tensor=True)),
                  ("per-tensor + smoothing", dict(per_tensor=True, smooth_alpha=0.5))):
    got = quantize_w8a8(w_gate, absmax, **kw).matmul(x)[2:]
    print(f"{label:24s} relative error on ordinary tokens {float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)):.3f}")
print(jax.jit(lambda x, q: q.matmul(x)).lower(x, quantize_w8a8(w_gate)).compile().as_text().count("s8[64,576]") > 0,
      "<- the compiled matmul multiplies int8 operands")"""),
    ("md", """## 4. The model, unchanged, on quantized params
`quantize_params(params, scheme)` swaps the projections for quantized leaves; the model's `linear`
op takes them as they are (here the tiny test model; the real model's numbers are in section 7)."""),
    ("code", """from models.llama import forward
from quantization.schemes import quantize_params

tiny = models.load("tiny")
tokens, positions = jnp.array([[3, 17, 200, 5, 9, 44, 81, 2]]), jnp.arange(8)[None]
run = jax.jit(lambda p: forward(p, tokens, positions, config=tiny.config)[0])
base = run(tiny.params)
for scheme in ("int8", "int4-g32", "w8a8"):
    print(f"{scheme:9s} mean |logit error| {float(jnp.abs(run(quantize_params(tiny.params, scheme)) - base).mean()):.4f}")"""),
    ("md", """## 5. GPTQ and AWQ on a real projection, calibrated on ShareGPT prompts
Calibration runs ShareGPT prompt windows through the unquantized model and records each projection
input's statistics, the Hessian x^T x among them. GPTQ pushes each row's rounding error onto the
rows not yet rounded; AWQ scales salient input channels up before rounding. Both are judged on
held-out prompt tokens by the output error they cause, the sum over tokens of ||x dW||^2, after
calibrating on 2 windows (512 tokens: fewer than this projection's 1536 inputs, so the Hessian is
singular) and on 16 (4,096 tokens, what `quantization.yaml` uses)."""),
    ("code", """from experiments.quant_calibration import activation_stats, calibration_windows
from quantization.awq import search_scales
from quantization.gptq import gptq_quantize

smollm2 = models.load("smollm2-135m")
windows = calibration_windows(smollm2, 18)
held_out = activation_stats(smollm2, windows[16:], hessian=True)["layers.3.w_down"]
w_down = smollm2.params["layers"][3]["w_down"]  # [in 1536, out 576]
error = lambda q, s=1.0: held_out.output_error(np.asarray(q.dequantize(jnp.float32), np.float64) / s - np.asarray(w_down))
print(f"round to nearest: int4 g128 sym {error(quantize_weight(w_down, 4, 128)):8.1f}, "
      f"asym {error(quantize_weight(w_down, 4, 128, False)):8.1f}  (held-out output error)")
for num_windows in (2, 16):
    calibration = activation_stats(smollm2, windows[:num_windows], hessian=True)["layers.3.w_down"]
    s, alpha = search_scales([w_down], calibration, 4, 128, symmetric=False)
    print(f"calibrated on {calibration.tokens:5d} tokens: GPTQ int4 g128 sym "
          f"{error(gptq_quantize(w_down, calibration.hessian, 4, 128)):8.1f}, AWQ int4 g128 asym (alpha {alpha:.2f}) "
          f"{error(quantize_weight(w_down * s[:, None], 4, 128, False), s[:, None]):8.1f}")"""),
    ("md", """## 6. The dequant-matmul kernel on the shipped Q4_1 blocks
The file's Q4_1 blocks become a `QuantizedTensor` with the same bytes (codes, f16 scales, f16
minimums); the Pallas kernel widens one tile at a time in registers and never writes the weight out
in float. Off a GPU it runs interpreted: this checks it, it does not time it."""),
    ("code", """from quantization.dequant_matmul import dequant_matmul, dequant_matmul_reference
from quantization.ggml_tensor import tensor_from_blocks

kept = tensor_from_blocks(np.asarray(tensor.data), "Q4_1", 1536)  # blk.3.ffn_down: [in 1536, out 576]
x = jnp.asarray(rng.standard_normal((4, 1536)), jnp.float32)
y = dequant_matmul(x, kept, interpret=True)
print(f"{kept.nbytes} bytes kept (the file's {tensor.data.nbytes}); max |kernel - reference| "
      f"{float(jnp.abs(y - dequant_matmul_reference(x, kept)).max()):.2e}")"""),
    ("md", """## 7. The measured table (real SmolLM2-135M, from the committed results file)
Bits per weight, model size, perplexity on lee_background.cor, logit error against the base, and
decode / prompt speed where the model runs on the quantized leaves (Q5 and K-quant formats: accuracy only)."""),
    ("code", """result = json.load(open("docs/results/quantization/results.json"))
fmt = lambda value, spec: "-" if value is None else format(value, spec)
print(f"{'run':20s} {'bits/w':>6s} {'MB':>6s} {'ppl':>7s} {'top-1':>6s} {'b1 tok/s':>8s} {'b64 tok/s':>9s}")
for r in result["runs"]:
    m = r["metrics"]
    print(f"{r['name']:20s} {m['bits_per_weight']:6.2f} {m['model_bytes'] / 1e6:6.0f} {m['perplexity']:7.2f} "
          f"{m['top1_agreement']:6.1%} {fmt(m['decode_b1_tokens_per_s'], '.1f'):>8s} {fmt(m['decode_b64_tokens_per_s'], '.0f'):>9s}")"""),
    ("code", """from IPython.display import Image
Image("docs/results/quantization/throughput_latency.png")"""),
]


def build(cells, path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    nbformat.write(nb, path)


def execute(path: Path, root: Path) -> None:
    """Run the notebook top to bottom (working directory: the repository root) and store its outputs."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    nbformat.write(nb, path)


if __name__ == "__main__":
    here = Path(__file__).parent
    for cells, name in ((PAGED_ATTENTION, "paged_attention"), (CONTINUOUS_BATCHING, "continuous_batching"),
                        (KERNEL_FUSION, "kernel_fusion"), (QUANTIZATION, "quantization")):
        build(cells, here / f"{name}.ipynb")
        if "--no-execute" not in sys.argv[1:]:
            execute(here / f"{name}.ipynb", here.parent)
