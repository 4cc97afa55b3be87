"""Pallas kernels, one folder per op (kernel.py, ops.py, reference.py).

Latent-attention decode and MLA flash attention land here (see the project issues); until then
the model runs its attention in XLA (deepseek_jax.model.mla).
"""
