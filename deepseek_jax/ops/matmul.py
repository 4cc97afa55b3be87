"""The one place where a weight meets an activation.

Every weight matmul of the model goes through ``weight_matmul``: attention projections
(W_DQ, W_UQ, W_DKV+W_KR, W_UK, W_UV, W_O, and the MHA/GQA baselines' W_K, W_V), the dense and
shared-expert SwiGLU, the router, the routed experts (through the grouped matmul), the MTP
projection and the output head. It casts both operands to the compute dtype and runs the
product. A number format plugs in here, not at twenty call sites: ``fmt`` selects V3's FP8
(1x128 activation tiles and 128x128 weight blocks, ``deepseek_jax/quant/fp8.py``) or the
per-tensor FP8 baseline for the einsum path (the model does not pass it yet).

Axis letters follow the caller's legend; ``eqn`` is an einsum equation with the activation
first and the weight second, e.g. ``"BTD,DF->BTF"``.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from deepseek_jax.quant.fp8 import fp8_einsum

Product = Callable[[jax.Array, jax.Array], jax.Array]


MATMUL_FORMATS = ("bf16", "fp8_blockwise", "fp8_tensorwise")


def weight_matmul(eqn: str, x: jax.Array, w, *, dtype, preferred_element_type=None,
                  product: Optional[Product] = None, fmt: str = "bf16") -> jax.Array:
  """``einsum(eqn, x, w)`` with both operands in ``dtype``.

  Args:
    eqn: einsum equation, activation operand first, weight second.
    x: activation, any float dtype.
    w: the weight (an ``nnx.Param`` or an array, stored in ``param_dtype``).
    dtype: compute dtype of both operands ("float32", "bfloat16", ...). The router passes
      float32 (V3 §3.3 keeps gating in high precision).
    preferred_element_type: accumulation / output dtype of the einsum (e.g. float32 for the
      logits); ignored with ``product``, which chooses its own.
    product: replaces the einsum for products that are not one (the grouped expert matmul,
      tile-space expert matmuls); ``eqn`` then documents the contraction.
    fmt: the number format of the product: "bf16" (the operands in ``dtype``), or
      "fp8_blockwise" / "fp8_tensorwise": all three GEMMs in E4M3 (``quant.fp8``: V3's 1x128 /
      128x128 scaling, or one scale per operand), f32 accumulation, the result in ``dtype``.
  Returns the product; with the einsum its dtype is ``preferred_element_type`` or ``dtype``.
  Raises ValueError for an unknown ``fmt``, or FP8 with ``product`` (not built yet).
  """
  x = x.astype(dtype)
  w = w[...].astype(dtype)  # an nnx.Param's value, or the array itself
  if fmt != "bf16":
    if fmt not in MATMUL_FORMATS:
      raise ValueError(f"matmul format must be one of {MATMUL_FORMATS}, got {fmt!r}")
    if product is not None:
      raise ValueError(f"{fmt} for a product= matmul ({eqn}: the grouped expert matmul) is not "
                       "built yet; use bf16 for it")
    return fp8_einsum(eqn, x, w, fmt.split("_", 1)[1])
  return _product(eqn, x, w, preferred_element_type, product)


def _product(eqn, x, w, preferred_element_type, product):
  """The contraction itself, on operands already in the compute dtype."""
  if product is not None:
    return product(x, w)
  return jnp.einsum(eqn, x, w, preferred_element_type=preferred_element_type)
