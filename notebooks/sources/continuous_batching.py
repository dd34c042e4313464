"""The cells of notebooks/continuous_batching.ipynb (continuous batching): (kind, source) pairs, kind "md" or
"code"; `python notebooks/build_notebooks.py` writes and executes the notebook from them."""

CELLS = [
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
