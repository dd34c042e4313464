"""The cells of notebooks/kernel_fusion.ipynb (kernel fusion): (kind, source) pairs, kind "md" or
"code"; `python notebooks/build_notebooks.py` writes and executes the notebook from them."""

CELLS = [
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
