"""Pallas kernels for Multi-head Latent Attention and DeepSeek-V3's FP8 GEMMs, one folder per op.

    mla_decode/        absorbed MLA decoding over a contiguous or paged latent cache (FlashMLA's
                       "MQA mode"), split-KV; kernel_tpu.py (Mosaic TPU), kernel_gpu.py (Triton
                       lowering), kernel_mgpu.py (Mosaic GPU, Hopper)
    flash_attention/   MLA training/prefill attention (d_qk != d_v, causal, segment ids),
                       forward and backward; kernel_tpu.py, kernel_gpu.py
    fp8_gemm/          V3's block-scaled FP8 GEMM (1x128 activation tiles, 128x128 weight
                       blocks, f32 promotion per 128-K slice) and its grouped MoE form;
                       kernel_mgpu.py (Mosaic GPU, Hopper). ``ops.matmul`` calls it; its oracle
                       is ``deepseek_jax.quant.fp8.scaled_dot`` (in the tests)

The attention folders have reference.py (the pure-JAX oracle the tests compare against) and
ops.py (the one function the model calls: picks the kernel for the platform being compiled for,
wires the gradients, falls back to XLA for shapes a kernel cannot take). Every kernel takes
``interpret=True`` to run on CPU. This package does not import deepseek_jax.
"""
