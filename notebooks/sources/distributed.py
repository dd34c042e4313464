"""The cells of notebooks/distributed.ipynb (distributed inference): (kind, source) pairs, kind "md"
or "code"; `python notebooks/build_notebooks.py` writes and executes the notebook from them."""

CELLS = [
    ("md", """# Distributed inference: Megatron tensor parallelism, pipeline stages, several processes

`distributed/` splits the unchanged model over a `jax.sharding.Mesh`. This notebook runs on 8 fake
CPU devices (XLA is asked for them before jax starts its backend), so it shows *structure* (what
each device holds, which collectives XLA compiled, that the numbers equal one device's), not
speed: the fake devices share this machine's cores. It places the real SmolLM2-135M Megatron-style,
reads the all-reduces out of the compiled HLO, writes the same layer with explicit `psum`s, runs a
pipeline with micro-batches, serves a prompt through the engine at tp 3, launches two processes
under `jax.distributed`, and reads the measured and projected tables from the committed results
files (`python -m experiments.run experiments/configs/distributed.yaml`, and
`distributed_projection.yaml`)."""),
    ("code", """import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # before jax starts its CPU backend
import json, subprocess, sys
import jax
import jax.numpy as jnp
import numpy as np
import models
from distributed.mesh import make_mesh

print(len(jax.devices()), "devices:", jax.devices()[:3], "...")
mesh = make_mesh(tp=2, pp=2)
print(mesh.shape, "\\n", mesh.devices)"""),
    ("md", """## 1. The Megatron layout as PartitionSpecs
QKV and gate / up are column-parallel (`P(None, "tp")`), O and down row-parallel (`P("tp")`), the
embedding vocab-parallel. SmolLM2 has 9 query heads and 3 KV heads: at tp 3 every device holds 3
query heads and its own KV head; at tp 2 the 3 KV heads do not split, so K / V (and the KV cache)
are replicated."""),
    ("code", """from distributed.tensor_parallel import param_specs, shard_params

model = models.load("smollm2-135m")
config = model.config
for tp in (2, 3):
    specs = param_specs(model.params, config, tp)["layers"][0]
    print(f"tp {tp}:", {name: tuple(spec) for name, spec in specs.items()})
sharded = shard_params(model.params, config, make_mesh(tp=3))
wq = sharded["layers"][0]["wq"]
print("wq", wq.shape, "-> per device", {str(s.device): s.data.shape for s in wq.addressable_shards})"""),
    ("md", """## 2. One device's logits, and Megatron's all-reduces in the compiled HLO
Under `jax.jit`, XLA's SPMD partitioner inserts the collectives the shardings need. A forward over
a batch of tokens at tp 3 compiles to 2 all-reduces per layer (attention output, MLP down) plus
one for the vocab-parallel embedding: Megatron's count, read from the HLO text."""),
    ("code", """from distributed.hlo_comm import collectives
from models.llama import forward

tokens = jnp.asarray(model.tokenizer("The capital of France is Paris. The capital of Italy is").input_ids)[None]
positions = jnp.arange(tokens.shape[1])[None]
run = jax.jit(lambda params: forward(params, tokens, positions, config=config)[0])
one_device = run(model.params)
for tp in (2, 3):
    placed = shard_params(model.params, config, make_mesh(tp=tp))
    gap = float(jnp.abs(run(placed) - one_device).max())
    comm = collectives(run.lower(placed).compile().as_text())
    print(f"tp {tp}: max |logit gap| {gap:.1e}; all-reduces {comm['all-reduce']['count']} "
          f"(Megatron: {2 * config.num_layers + 1}), all-gathers {comm['all-gather']['count']}")
print("next token:", model.tokenizer.decode(int(one_device[0, -1].argmax())))"""),
    ("md", """At tp 3 the count is Megatron's. At tp 2 the 9 heads do not divide: XLA still computes the
exact result, but moves data to cut heads in two (extra collectives), which is why vLLM and
Megatron require the head count to divide by tp.

## 3. The same layer with the collectives written out (`jax.shard_map`)
`megatron_layer` runs the unchanged `decoder_layer` on each device's shards, under an ops set whose
`linear` adds a `lax.psum` after each row-parallel weight."""),
    ("code", """from distributed.tp_layer import megatron_layer, megatron_layer_params
from models.llama import decoder_layer
from models.ops import get_ops, rope_cos_sin

layer = model.params["layers"][0]
rng = np.random.default_rng(0)
hidden, residual = (jnp.asarray(rng.standard_normal((1, 16, config.hidden_size)), jnp.float32) for _ in range(2))
pos = jnp.arange(16)[None]
cos, sin = rope_cos_sin(pos, config.head_dim, config.rope_theta)
want = decoder_layer(layer, hidden, residual, cos, sin, None, pos, None, config=config, backend="contiguous",
                     ops=get_ops("xla"))[:2]
explicit = jax.jit(megatron_layer(megatron_layer_params(layer, config, 3), config, make_mesh(tp=3)))
got = explicit(hidden, residual, cos, sin, pos)
hlo = explicit.lower(hidden, residual, cos, sin, pos).compile().as_text()
print("max |gap|", max(float(jnp.abs(g - w).max()) for g, w in zip(got, want)),
      "| all-reduces in the layer:", collectives(hlo)["all-reduce"]["count"])"""),
    ("md", """## 4. Pipeline stages with micro-batches
Two stages of two tensor-parallel devices each: stage 0 holds layers 0-14 and the embedding, stage 1
layers 15-29, the final norm and (tied) head. Each micro-batch's hidden state and residual are the
only data handed from stage to stage."""),
    ("code", """from distributed.pipeline import Pipeline

batch = jnp.concatenate([tokens] * 4)
batch_positions = jnp.concatenate([positions] * 4)
pipe = Pipeline(model.params, config, make_mesh(pp=2, tp=2), num_microbatches=4)
print("layers per stage:", [len(r) for r in pipe.ranges])
print("stage devices:", [sorted(d.id for d in m.devices.flat) for m in pipe.meshes])
gap = float(jnp.abs(pipe.forward(batch, batch_positions) - jnp.concatenate([one_device] * 4)).max())
print(f"max |logit gap| vs one device: {gap:.1e}")"""),
    ("md", """## 5. The engine at tp 3: params and paged KV cache split by head
`EngineConfig(tp=3)` (the run-config key `tp`) places params and cache on `make_mesh(tp=3)`; the
scheduler does not change, and greedy decoding gives one device's tokens."""),
    ("code", """from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.sampling_params import SamplingParams

prompt = "The three primary colors of light are"
greedy = SamplingParams(max_tokens=24, temperature=0)
texts = {}
for tp in (1, 3):
    engine = Engine(model, EngineConfig(num_blocks=64, max_model_len=256, tp=tp))
    texts[tp] = engine.generate([prompt], greedy, progress=False)[0].outputs[0].text
    k_cache = engine.runner.kv_cache[0][0]
    print(f"tp {tp}: KV cache per device {k_cache.addressable_shards[0].data.shape} of {k_cache.shape}")
print(repr(texts[3]))
assert texts[1] == texts[3]"""),
    ("md", """## 6. Two processes, one program
`python -m distributed.launch --nproc 2 -m continuous_batching.multihost` starts two processes on
127.0.0.1 that join one `jax.distributed` program (one CPU device each, so the mesh spans both); the
scheduler runs on process 0 and broadcasts each step's inputs; the launcher stops every process and
exits non-zero, naming the rank, when one dies."""),
    ("code", """env = dict(os.environ, JAX_PLATFORMS="cpu")
env.pop("XLA_FLAGS")  # one device per process
done = subprocess.run([sys.executable, "-m", "distributed.launch", "--nproc", "2", "--timeout", "300", "-m",
                       "continuous_batching.multihost", "--model", "tiny", "--num-prompts", "3"],
                      env=env, capture_output=True, text=True, timeout=360)
print("exit", done.returncode)
print("\\n".join(line for line in done.stdout.splitlines() if "->" in line))
print("\\n".join(line for line in done.stderr.splitlines() if line.startswith(("launch:", "rank"))))"""),
    ("md", """## 7. The measured table and the paper-scale projection
From the committed results files: each layout's bytes per device, the collectives of one decode
step of 8 sequences (HLO) beside Megatron's all-reduce payload, and step times on fake devices;
then Llama-2 on 80 GB GPUs from `distributed/projection.py` (arithmetic, not measured)."""),
    ("code", """from experiments.tables import markdown_table
from IPython.display import Markdown

measured = json.load(open("docs/results/distributed/results.json"))
projected = json.load(open("docs/results/distributed_projection/results.json"))
Markdown(markdown_table(measured["runs"]) + "\\n\\n" + markdown_table(projected["runs"]))"""),
    ("code", """from IPython.display import Image
Image("docs/results/distributed/throughput_latency.png")"""),
]
