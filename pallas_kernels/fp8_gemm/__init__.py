"""DeepSeek-V3's block-scaled FP8 GEMM (1x128 activation tiles, 128x128 weight blocks, E4M3
with f32 promotion every 128 K elements) as a Pallas Mosaic GPU kernel for Hopper, dense and
M-grouped (MoE, DeepGEMM's contiguous layout): kernel_mgpu.py. The pure-JAX oracle is
``deepseek_jax.quant.fp8.scaled_dot`` (this package does not import deepseek_jax)."""
