"""A token embedding kept as llama.cpp's Q8_0 blocks, serving both the lookup and a tied LM head.

    params = quantize_embedding(params)      # params["embed"] -> QuantizedEmbedding (Q8_0), if rows cut
    x = ops.embed(params["embed"], tokens)   # the tokens' rows, dequantized
    logits = ops.logits(h, params["embed"], transposed=True)   # h @ table.T, over the blocks

GGUF's `token_embd` is stored like a projection: one row of `hidden` values per token, cut into
blocks of 32 along `hidden`, one scale per block (Q8_0: `d * q`, 8.5 bits per weight). A
`QuantizedTensor` groups rows per column, so those blocks are the QuantizedTensor [hidden, vocab]
with groups of 32 rows: the table's transpose, which is also the LM head's orientation (a tied
model's logits are `h @ table.T`). `QuantizedEmbedding` wraps that tensor and presents the table's
shape [vocab, hidden] and dtype; a lookup dequantizes only the requested columns.

The 4-bit schemes quantize the table this way (`EMBEDDING_Q8_0_SCHEMES`), as llama.cpp's files do:
SmolLM2's shipped GGUF holds Q4_1 projections and a Q8_0 token_embd, and `llama-quantize` keeps the
tied embedding at Q6_K / Q8_0 while the layers go to 4 bits. Our f32 base table *is* that file's
Q8_0 table dequantized, so re-quantizing it gives back the same blocks (tested): no error added on
the real model. A table whose hidden size 32 does not divide stays in float (llama.cpp would fall
back to F16), as does an untied model's table.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from quantization.ggml_legacy import BLOCK
from quantization.ggml_tensor import quantize_to_tensor
from quantization.quantized_tensor import QuantizedTensor


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedEmbedding:
    weight: QuantizedTensor  # [hidden, vocab]: the table's transpose, blocks along hidden
    dtype_name: str = dataclasses.field(default="float32", metadata=dict(static=True))  # the table's dtype

    @property
    def shape(self) -> tuple[int, int]:
        """The table's shape [vocab, hidden]."""
        hidden, vocab = self.weight.shape
        return (vocab, hidden)

    @property
    def dtype(self):
        """The dtype the table computes in (the float table's it replaced)."""
        return jnp.dtype(self.dtype_name)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def take_rows(self, tokens: jax.Array) -> jax.Array:
        """The rows of `tokens` (any shape) dequantized: [*tokens.shape, hidden] in `dtype`."""
        flat = tokens.reshape(-1)
        columns = dataclasses.replace(self.weight, values=self.weight.values[:, flat],
                                      scales=self.weight.scales[:, flat],
                                      zeros=None if self.weight.zeros is None else self.weight.zeros[:, flat],
                                      mins=None if self.weight.mins is None else self.weight.mins[:, flat])
        return columns.dequantize(self.dtype).T.reshape(*tokens.shape, self.shape[1])

    def head(self, dtype=None) -> jax.Array:
        """The LM head [hidden, vocab] (the table's transpose) dequantized, in `dtype` (default: the table's)."""
        return self.weight.dequantize(dtype or self.dtype)

    def dequantize(self, dtype=None) -> jax.Array:
        """The whole table [vocab, hidden]."""
        return self.weight.dequantize(dtype or self.dtype).T


def quantize_embedding(params: dict) -> dict:
    """params with a tied embedding table as Q8_0 blocks (`QuantizedEmbedding`); unchanged when the
    model has its own `lm_head`, the table is already quantized, or 32 does not divide its width."""
    table = params["embed"]
    if "lm_head" in params or isinstance(table, (QuantizedTensor, QuantizedEmbedding)) or table.shape[1] % BLOCK:
        return params
    return {**params, "embed": QuantizedEmbedding(quantize_to_tensor(table.T, "Q8_0"), str(table.dtype))}
