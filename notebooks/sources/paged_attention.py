"""The cells of notebooks/paged_attention.ipynb (paged attention): (kind, source) pairs, kind "md" or
"code"; `python notebooks/build_notebooks.py` writes and executes the notebook from them."""

CELLS = [
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
