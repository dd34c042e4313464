"""The ops seam: every computation the decoder does, bundled in one frozen ops set chosen by name.

    ops = get_ops("xla")                                   # or an Ops instance (a subclass)
    x = ops.embed(params["embed"], tokens)                 # [*lead, hidden]
    h, residual = ops.rms_norm(x, weight, eps, residual)   # residual add fused into the norm
    out, layer_cache = ops.self_attention(h, layer, cos, sin, layer_cache, positions, metadata,
                                          config=config, backend=backend)   # = qkv_rope, then attention
    q, k, v = ops.qkv_rope(h, layer, cos, sin, config=config)
    out, layer_cache = ops.attention(q, k, v, layer_cache, positions, metadata, backend=backend)
    y = ops.linear(h, w)                                   # w: an array or a QuantizedTensor
    y = ops.swiglu_mlp(h, layer)
    logits = ops.logits(x, head, transposed=tied)          # f32

`models/llama.py` calls only these, so a fused kernel (a subclass overriding `rms_norm` or
`swiglu_mlp`), a quantized weight (a `quantization.QuantizedTensor` leaf in params, which `linear`
and `embed` dequantize) or a new attention path enters without editing the model. The composite ops
(`self_attention`, `qkv_rope`, `swiglu_mlp`) are written in terms of `self.qkv_rope`,
`self.attention`, `self.linear`, `self.rope` and `self.silu_mul`, so an ops set that only replaces
`linear` changes every projection. An ops set is a frozen dataclass: hashable, so it is a static
argument of the jitted step, and two sets with the same class and name compile to the same program.

    unfused each op its own compiled program, the step not compiled around them (the eager baseline)
    xla     plain jnp; XLA fuses what it can (the model's ops before the seam existed)
    pallas  the fused kernels of `kernel_fusion/`: residual add + RMSNorm in one kernel, gate and up
            as one matmul with SiLU-multiply fused (the down projection stays `linear`); on a paged
            cache, QKV projection + RoPE + the K/V write into the cache slots as one kernel, then the
            backend's attention over the written cache (elsewhere: one matmul over `wqkv`, then RoPE);
            QuantizedTensor projections through the dequant-matmul kernel
            (`quantization/dequant_matmul.py`) instead, never dequantized whole
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kernel_fusion.fuse_params import FUSED, fuse_params, pad_intermediate
from kernel_fusion.qkv_rope import fused_qkv_rope
from kernel_fusion.rms_norm import fused_add_rms_norm
from kernel_fusion.swiglu import fused_swiglu
from models.attention import PagedBackend, get_backend
from quantization.dequant_matmul import dequant_matmul, tiling_problem
from quantization.quantized_embedding import QuantizedEmbedding
from quantization.quantized_tensor import QuantizedTensor
from quantization.w8a8 import W8A8Tensor


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in f32, cast back to x's dtype, then scaled (HF Llama order)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, xp=jnp) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables f32[*positions.shape, head_dim] for the rotate-half RoPE convention; `xp=np`
    builds them on the host (the paged runner does, once per step: traced, XLA CPU recomputes
    sin / cos inside every fusion of every layer that reads them). The angles are the same f32
    products either way; only the last bits of cos / sin can differ."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))  # f32[head_dim/2]
    freqs = positions.astype(np.float32)[..., None] * xp.asarray(inv_freq)  # f32[..., head_dim/2]
    angles = xp.concatenate([freqs, freqs], axis=-1)
    return xp.cos(angles), xp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [..., heads, head_dim] by the tables [..., head_dim] (HF `rotate_half` layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[..., None, :].astype(x.dtype), sin[..., None, :].astype(x.dtype)
    return x * cos + rotated * sin


def dense(weight, dtype) -> jax.Array:
    """A weight leaf as a plain array: a QuantizedTensor / W8A8Tensor dequantized to
    `dtype`, an array as is."""
    return weight.dequantize(dtype) if isinstance(weight, (QuantizedTensor, W8A8Tensor)) else weight


@dataclasses.dataclass(frozen=True)
class Ops:
    """The `xla` ops set, and the base class of every other (override the ops you replace)."""

    name: str = "xla"
    jit_step: ClassVar[bool] = True  # a runner compiles its whole step as one program around these ops

    def kv_heads_seen(self, config) -> int:
        """KV heads one attention call of this set sees: the model's (a set that runs attention per
        device on its share of the heads, `distributed/head_parallel.py`, sees that share); the
        paged metadata's index lists are built for this many."""
        return config.num_kv_heads

    def prepare_params(self, params: dict) -> dict:
        """The params layout this set runs on, made once when a runner takes the model (a set
        whose kernels read fused weights fuses them here); the `xla` set runs on either layout."""
        return params

    def embed(self, table, tokens: jax.Array) -> jax.Array:
        """Rows of the embedding table [vocab, hidden] (array, QuantizedTensor or QuantizedEmbedding):
        [*tokens.shape, hidden]."""
        if isinstance(table, (QuantizedTensor, QuantizedEmbedding)):
            return table.take_rows(tokens)
        return table[tokens]

    def linear(self, x: jax.Array, weight) -> jax.Array:
        """x [..., in] @ weight [in, out] (array, QuantizedTensor, or W8A8Tensor: an int8 x int8 dot)
        -> [..., out] in x's dtype."""
        if isinstance(weight, W8A8Tensor):
            return weight.matmul(x)
        return x @ dense(weight, x.dtype)

    def rms_norm(self, x: jax.Array, weight: jax.Array, eps: float,
                 residual: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(RMSNorm(x + residual), x + residual); without a residual, (RMSNorm(x), x)."""
        if residual is not None:
            x = x + residual
        return rms_norm(x, weight, eps), x

    def qkv_rope(self, x: jax.Array, layer: dict, cos: jax.Array, sin: jax.Array, *, config):
        """Project x [*lead, hidden] to q [*lead, heads, head_dim] and k, v [*lead, kv_heads, head_dim],
        with RoPE applied to q and k."""
        lead, q_cols = x.shape[:-1], config.num_heads * config.head_dim
        if "wqkv" in layer:  # fused layout (kernel_fusion.fuse_params): one matmul, then split
            q, k, v = jnp.split(self.linear(x, layer["wqkv"]), [q_cols, q_cols + config.num_kv_heads * config.head_dim],
                                axis=-1)
        else:
            q, k, v = (self.linear(x, layer[name]) for name in ("wq", "wk", "wv"))
        q = q.reshape(*lead, config.num_heads, config.head_dim)
        k = k.reshape(*lead, config.num_kv_heads, config.head_dim)
        v = v.reshape(*lead, config.num_kv_heads, config.head_dim)
        return self.rope(q, cos, sin), self.rope(k, cos, sin), v

    def rope(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """RoPE on x [..., heads, head_dim] (`apply_rope`); `qkv_rope` calls it for q and k."""
        return apply_rope(x, cos, sin)

    def swiglu_mlp(self, x: jax.Array, layer: dict) -> jax.Array:
        """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); gate and up as one matmul when the
        layer holds them fused (`w_gate_up`, gate columns first)."""
        if "w_gate_up" in layer:
            gate, up = jnp.split(self.linear(x, layer["w_gate_up"]), 2, axis=-1)
        else:
            gate, up = self.linear(x, layer["w_gate"]), self.linear(x, layer["w_up"])
        return self.linear(self.silu_mul(gate, up), layer["w_down"])

    def silu_mul(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        """silu(gate) * up, the SwiGLU activation `swiglu_mlp` calls between its matmuls."""
        return jax.nn.silu(gate) * up

    def self_attention(self, x, layer: dict, cos, sin, layer_cache, positions, metadata, *, config,
                       backend: str):
        """A layer's attention up to (not including) its output projection: `qkv_rope`, then
        `attention`. Returns (out [*lead, heads, head_dim], layer_cache)."""
        q, k, v = self.qkv_rope(x, layer, cos, sin, config=config)
        return self.attention(q, k, v, layer_cache, positions, metadata, backend=backend)

    def attention(self, q, k, v, layer_cache, positions, metadata, *, backend: str):
        """One layer's attention through the named KV-cache backend (`models.attention`)."""
        return get_backend(backend)(q, k, v, layer_cache, positions, metadata)

    def logits(self, x: jax.Array, head, *, transposed: bool = False) -> jax.Array:
        """f32 logits x [..., hidden] @ head [hidden, vocab] (or head.T when `transposed`: a tied
        embedding table [vocab, hidden]; a QuantizedEmbedding's blocks already lie as the head [hidden, vocab])."""
        if isinstance(head, QuantizedEmbedding):
            if not transposed:
                raise ValueError("a QuantizedEmbedding is a tied embedding table: call logits with transposed=True")
            head, transposed = head.head(x.dtype), False
        else:
            head = dense(head, x.dtype)
        return jnp.matmul(x, head.T if transposed else head, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class PallasOps(Ops):
    """The `pallas` set: the fused kernels of `kernel_fusion/` where they exist (see the module
    docstring). It runs on fused params: `prepare_params` applies `kernel_fusion.fuse_params` and pads
    the intermediate size to the kernel's tile with zero units (which add nothing), once, when a
    runner takes the model. Kernels are written for GPU; off a GPU they run interpreted (`interpret`
    None: decided by jax's default backend at trace time), which checks them, not their speed."""

    name: str = "pallas"
    interpret: bool | None = None  # None: interpret unless jax's default backend is a GPU

    def _interpret(self) -> bool:
        return jax.default_backend() != "gpu" if self.interpret is None else self.interpret

    def prepare_params(self, params: dict) -> dict:
        """Fused weights, the intermediate size padded to a multiple of 16 (Triton's dot tiles); quantized
        params as they are (their projections run through `linear`'s dequant-matmul kernel)."""
        first = params["layers"][0]
        if _is_quantized(first.get("wqkv", first.get("wq"))):
            return params
        fused = params if "w_gate_up" in params["layers"][0] else fuse_params(params)
        return pad_intermediate(fused, 16)

    def linear(self, x, weight):
        """A QuantizedTensor the kernel can tile through `dequant_matmul`; anything else as the base op."""
        if isinstance(weight, QuantizedTensor) and tiling_problem(weight) is None:
            return dequant_matmul(x, weight, interpret=self._interpret())
        return super().linear(x, weight)

    def rms_norm(self, x, weight, eps, residual=None):
        return fused_add_rms_norm(x, residual, weight, eps=eps, interpret=self._interpret())

    def self_attention(self, x, layer, cos, sin, layer_cache, positions, metadata, *, config, backend):
        """On a paged cache (flat tokens): the fused QKV + RoPE + cache-write kernel, then the
        backend's attention over the cache it wrote; elsewhere (or with quantized projections) the
        base composite."""
        attention = get_backend(backend)
        wqkv = self._fused(layer, "wqkv")
        if not isinstance(attention, PagedBackend) or layer_cache is None or wqkv is None:
            return super().self_attention(x, layer, cos, sin, layer_cache, positions, metadata, config=config,
                                          backend=backend)
        q, k_cache, v_cache = fused_qkv_rope(x, wqkv, cos, sin, *layer_cache,
                                             metadata.slot_mapping, num_heads=config.num_heads,
                                             num_kv_heads=config.num_kv_heads, interpret=self._interpret())
        return attention.attend_cached(q, (k_cache, v_cache), metadata), (k_cache, v_cache)

    @staticmethod
    def _fused(layer: dict, name: str) -> jax.Array | None:
        """The layer's fused float weight `name`; None when the projections are quantized (the fused
        kernels take float weights: the base composite runs, its matmuls through `linear`)."""
        weight = layer.get(name, layer.get(FUSED[name][0]))
        if _is_quantized(weight):
            return None
        if name not in layer:
            raise ValueError(f"the pallas ops set runs on fused params ({name}): pass "
                             "kernel_fusion.fuse_params(params), or let a runner prepare them")
        return layer[name]

    def swiglu_mlp(self, x, layer):
        w_gate_up = self._fused(layer, "w_gate_up")
        if w_gate_up is None:
            return super().swiglu_mlp(x, layer)
        act = fused_swiglu(x, w_gate_up, interpret=self._interpret())
        return self.linear(act, layer["w_down"])


def _is_quantized(weight) -> bool:
    return isinstance(weight, (QuantizedTensor, W8A8Tensor))


_XLA = Ops()
_embed, _linear, _rope = jax.jit(_XLA.embed), jax.jit(_XLA.linear), jax.jit(apply_rope)
_rms_norm = jax.jit(_XLA.rms_norm, static_argnames=("eps",))
_logits = jax.jit(_XLA.logits, static_argnames=("transposed",))
_silu_mul = jax.jit(lambda gate, up: jax.nn.silu(gate) * up)
_attention = jax.jit(_XLA.attention, static_argnames=("backend",), donate_argnums=(3,))  # the layer's cache


@dataclasses.dataclass(frozen=True)
class UnfusedOps(Ops):
    """The `unfused` set, the "PyTorch eager" baseline FasterTransformer compares against: each op
    (an embedding, one projection, a norm, RoPE, SiLU-multiply, a layer's attention, the LM head) is
    its own compiled program, called one after another from Python, and a runner does not compile a
    step around them (`jit_step` False). XLA fuses within an op, never across ops: every op's output
    makes a round trip to memory and every op pays a dispatch."""

    name: str = "unfused"
    jit_step: ClassVar[bool] = False

    def embed(self, table, tokens):
        return _embed(table, tokens)

    def linear(self, x, weight):
        return _linear(x, weight)

    def rms_norm(self, x, weight, eps, residual=None):
        return _rms_norm(x, weight, eps, residual)

    def rope(self, x, cos, sin):
        return _rope(x, cos, sin)

    def silu_mul(self, gate, up):
        return _silu_mul(gate, up)

    def attention(self, q, k, v, layer_cache, positions, metadata, *, backend):
        return _attention(q, k, v, layer_cache, positions, metadata, backend=backend)

    def logits(self, x, head, *, transposed=False):
        return _logits(x, head, transposed=transposed)

    def prepare_params(self, params):
        if "wqkv" in params["layers"][0]:
            raise ValueError("the unfused ops set runs on the model's separate projections, not fused params")
        return params


OPS_SETS: dict[str, Ops] = {"unfused": UnfusedOps(), "xla": _XLA, "pallas": PallasOps()}


def get_ops(kernels: "str | Ops") -> Ops:
    """The ops set named `kernels` (one of `OPS_SETS`), or `kernels` itself when it is an Ops."""
    if isinstance(kernels, Ops):
        return kernels
    try:
        return OPS_SETS[kernels]
    except (KeyError, TypeError):
        raise ValueError(f"kernels must be one of {sorted(OPS_SETS)} (or an models.ops.Ops), "
                         f"got {kernels!r}") from None
