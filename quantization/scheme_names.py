"""The names a run config's `quantization` key accepts (plain data, no JAX: the config checks read it
before any model loads).

    none                      the weights as loaded
    int8, int8-asym           weight-only int8, one scale (and zero point) per output channel
    int4-g{32,64,128}[-asym]  weight-only int4, one scale (and zero point) per group of input rows
    w8a8                      int8 weights x int8 activations (per-token dynamic scales)
    w8a8-smooth               the same after SmoothQuant smoothing (alpha 0.5; needs calibration)
    w8a8-tensor[-smooth]      one static activation scale per tensor from calibration (the
                              variant that collapses on outlier channels), optionally smoothed
    gptq-int4-g{32,64,128}[-act]  GPTQ: int4 groups, symmetric, rounding errors compensated through
                              the calibration Hessian; -act visits rows by activation order
    awq-int4-g{32,64,128}     AWQ: activation-aware per-channel scales folded into the norms,
                              then int4 groups with a zero point
    fp8-e4m3, fp8-e4m3-tensor FP8 E4M3 weights, one scale per output channel / per tensor
    Q4_0 ... Q6_K             llama.cpp block formats (`quantization/ggml_formats.py`)
"""

from __future__ import annotations

GROUP_SIZES = (32, 64, 128)
WEIGHT_ONLY_SCHEMES = ("int8", "int8-asym", *(f"int4-g{g}{a}" for g in GROUP_SIZES for a in ("", "-asym")))
W8A8_SCHEMES = ("w8a8", "w8a8-smooth", "w8a8-tensor", "w8a8-tensor-smooth")
GPTQ_SCHEMES = (*(f"gptq-int4-g{g}" for g in GROUP_SIZES), "gptq-int4-g128-act")
AWQ_SCHEMES = tuple(f"awq-int4-g{g}" for g in GROUP_SIZES)
HESSIAN_SCHEMES = (*GPTQ_SCHEMES, *AWQ_SCHEMES)  # calibrate with x^T x per projection
# need activation statistics
CALIBRATED_SCHEMES = ("w8a8-smooth", "w8a8-tensor", "w8a8-tensor-smooth", *HESSIAN_SCHEMES)
FP8_SCHEMES = ("fp8-e4m3", "fp8-e4m3-tensor")
SCHEME_NAMES = ("none", *WEIGHT_ONLY_SCHEMES, *W8A8_SCHEMES, *HESSIAN_SCHEMES, *FP8_SCHEMES)
BLOCK_FORMAT_NAMES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K")
QUANTIZATIONS = (*SCHEME_NAMES, *BLOCK_FORMAT_NAMES)
# the 4-bit schemes: a tied embedding table goes to Q8_0 blocks too (`quantization/quantized_embedding.py`)
EMBEDDING_Q8_0_SCHEMES = (*(s for s in WEIGHT_ONLY_SCHEMES if s.startswith("int4")), *HESSIAN_SCHEMES,
                          "Q4_0", "Q4_1", "Q4_K")
