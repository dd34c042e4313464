"""The shared pure-JAX Llama-family model, its configs and weight loading.

    import models
    model = models.load("smollm2-135m")          # real SmolLM2-135M-Instruct (GGUF, dequantized)
    ids = model.tokenizer("The capital of France is").input_ids
    models.generate(model, [ids], max_new_tokens=8)
"""

from models.config import PRESETS, ModelConfig, get_preset
from models.llama import forward, init_params
from models.model import Model, generate, load

__all__ = ["PRESETS", "Model", "ModelConfig", "forward", "generate", "get_preset", "init_params", "load"]
