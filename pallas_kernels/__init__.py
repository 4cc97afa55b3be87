"""Pallas kernels for Multi-head Latent Attention, one folder per op.

    mla_decode/        absorbed MLA decoding over a contiguous or paged latent cache (FlashMLA's
                       "MQA mode"), split-KV; kernel_tpu.py (Mosaic TPU), kernel_gpu.py (Triton
                       lowering), kernel_mgpu.py (Mosaic GPU, Hopper)
    flash_attention/   MLA training/prefill attention (d_qk != d_v, causal, segment ids),
                       forward and backward; kernel_tpu.py, kernel_gpu.py

Each folder has reference.py (the pure-JAX oracle the tests compare against) and ops.py (the
one function the model calls: picks the kernel for the platform being compiled for, wires the
gradients, falls back to XLA for shapes a kernel cannot take). Every kernel takes
``interpret=True`` to run on CPU. This package does not import deepseek_jax.
"""
