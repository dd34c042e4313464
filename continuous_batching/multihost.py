"""The engine over several processes: one scheduler on process 0, one mesh over every process's devices.

    python -m distributed.launch --nproc 2 -m continuous_batching.multihost --model tiny --tp 2

Every process builds the same `Engine` (same model, same `EngineConfig`, a mesh over all of
`jax.devices()`), so params and KV cache are placed the same way everywhere, each process holding
its own shards. Process 0 then serves: its scheduler plans each step as on one device, and the
runner's `on_device_work` hook hands each piece of device work (a prepared step's host inputs, a
step's block copies) to `distributed.multihost.broadcast_object` before running it. The other
processes `follow`: receive, run the same program on the same inputs, until process 0 sends STOP.
Sampling runs inside the step program, so every process gets the same tokens, and only process 0
keeps them. Swapping to host memory is refused (a swapped block would have to gather every
process's shard), so preemption recomputes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import traceback
from pathlib import Path

import jax
import numpy as np

import models
from continuous_batching.engine import Engine
from continuous_batching.engine_config import EngineConfig
from continuous_batching.sampling_params import SamplingParams
from distributed.mesh import axis_size, make_mesh
from distributed.multihost import broadcast_object, initialize_from_env

STOP = ("stop", ())


def check_multihost(config: EngineConfig, mesh=None) -> None:
    """Refuse what the processes cannot share: swapping (a swapped block would need every process's
    shard) and pipeline stages (their runner steps stage by stage, not as one broadcast program)."""
    if config.num_cpu_blocks:
        raise ValueError(f"EngineConfig.num_cpu_blocks must be 0 across processes (got {config.num_cpu_blocks}): "
                         f"a block swapped to host memory would need every process's shard; use "
                         f"preemption='recompute'")
    if config.pp > 1 or axis_size(mesh, "pp") > 1:
        raise ValueError(f"EngineConfig.pp must be 1 across processes (got pp {max(config.pp, axis_size(mesh, 'pp'))}): "
                         f"several processes run tensor parallelism only")


@contextlib.contextmanager
def leading(engine: Engine):
    """On process 0: every piece of the engine's device work is broadcast before it runs, and on a
    normal exit the followers are told to stop. An error is not followed by STOP (the followers may
    be inside a step's collectives, waiting for process 0): it propagates, and the caller exits
    (`exit_now`) so that the launcher stops the rest."""
    check_multihost(engine.config, engine.mesh)
    engine.runner.on_device_work = broadcast_object
    yield engine
    engine.runner.on_device_work = None
    broadcast_object(STOP)


def exit_now(code: int = 1) -> None:
    """Print the exception being handled and end this process at once: jax's orderly shutdown
    would wait at a barrier for peers that are stuck in a collective."""
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(code)


def follow(engine: Engine) -> int:
    """On the other processes: run what process 0 broadcasts until STOP; returns the steps run."""
    check_multihost(engine.config, engine.mesh)
    steps = 0
    while (work := broadcast_object()) != STOP:
        method, args = work
        getattr(engine.runner, method)(*args)
        steps += method == "run"
    return steps


def engine_config(mesh) -> EngineConfig:
    """The demo's engine settings (a small cache, sized for its short random prompts) on `mesh`."""
    return EngineConfig(num_blocks=64, block_size=8, max_num_seqs=8, max_num_batched_tokens=128, max_model_len=64,
                        mesh=mesh)


def crash_after_first_step(engine: Engine) -> None:
    """Make this process die without cleanup (SIGKILL) once its runner has run one step."""
    run = engine.runner.run

    def run_then_die(prepared):
        run(prepared)
        os.kill(os.getpid(), signal.SIGKILL)

    engine.runner.run = run_then_die


def random_prompts(num_prompts: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Seeded prompts of 3..24 random token ids (never the special ids 0..2)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, int(n)).tolist() for n in rng.integers(3, 25, num_prompts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distributed.launch --nproc N -m continuous_batching.multihost",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a preset or path, as models.load takes")
    parser.add_argument("--random-weights", action="store_true", help="seeded random weights of the preset's shape")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: every device)")
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--fail-rank", type=int, default=None,
                        help="this rank kills itself (SIGKILL) after its first step: a crash, for the tests")
    parser.add_argument("--out", type=Path, default=None, help="process 0 writes the tokens here (JSON)")
    args = parser.parse_args(argv)
    rank = initialize_from_env()
    model = models.load(args.model, random_weights=args.random_weights, tokenizer=False)
    tp = args.tp or len(jax.devices())
    config = engine_config(mesh=make_mesh(tp=tp))
    engine = Engine(model, config)
    if args.fail_rank == rank:
        crash_after_first_step(engine)
    if rank != 0:
        steps = follow(engine)
        print(f"rank {rank}: ran {steps} steps", file=sys.stderr)
        return 0
    prompts = random_prompts(args.num_prompts, model.config.vocab_size, args.seed)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    try:
        with leading(engine):
            outputs = engine.generate(prompts, sampling, progress=False)
    except Exception:
        exit_now()
    tokens = [o.outputs[0].token_ids for o in outputs]
    for prompt, out in zip(prompts, tokens):
        print(f"{len(prompt)} prompt tokens -> {out}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "processes": jax.process_count(), "tp": tp,
                                        "devices": [str(d) for d in jax.devices()], "prompts": prompts,
                                        "tokens": tokens, "engine_config": {
                                            k: v for k, v in dataclasses.asdict(config).items() if k != "mesh"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
