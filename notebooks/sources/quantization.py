"""The cells of notebooks/quantization.ipynb (quantization): (kind, source) pairs, kind "md" or
"code"; `python notebooks/build_notebooks.py` writes and executes the notebook from them."""

CELLS = [
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
decode / prompt speed where the model runs on the quantized leaves (Q5 and K-quant formats: accuracy
only). The `*-int8-kv` rows add an INT8 paged KV cache (scales folded into the weights; perplexity
through the paged path, where K and V are rounded). The `llama.cpp-*` rows are llama.cpp itself on
GGUF files holding the same blocks: the same perplexities, and the speed of kernels that multiply
the integer codes directly."""),
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
