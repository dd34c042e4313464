"""Quantization: llama.cpp's block formats bit-exact (`ggml_formats`), the quantized-weight leaf the
model's ops accept (`quantized_tensor`); the weight/activation schemes come next (see docs/quantization.md)."""
