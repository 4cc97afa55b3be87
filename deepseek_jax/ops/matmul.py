"""The one place where a weight meets an activation.

Every weight matmul of the model goes through ``weight_matmul``: attention projections
(W_DQ, W_UQ, W_DKV+W_KR, W_UK, W_UV, W_O, and the MHA/GQA baselines' W_K, W_V), the dense and
shared-expert SwiGLU, the router, the routed experts (through the grouped matmul), the MTP
projection and the output head. It casts both operands to the compute dtype and runs the
product. A new number format (V3's FP8 with 1x128 activation and 128x128 weight scales, to
live in ``deepseek_jax/quant/``) plugs in here, not at twenty call sites.

Axis letters follow the caller's legend; ``eqn`` is an einsum equation with the activation
first and the weight second, e.g. ``"BTD,DF->BTF"``.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

Product = Callable[[jax.Array, jax.Array], jax.Array]


def weight_matmul(eqn: str, x: jax.Array, w, *, dtype, preferred_element_type=None,
                  product: Optional[Product] = None) -> jax.Array:
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
  Returns the product; with the einsum its dtype is ``preferred_element_type`` or ``dtype``.
  """
  x = x.astype(dtype)
  w = w[...].astype(dtype)  # an nnx.Param's value, or the array itself
  return _product(eqn, x, w, preferred_element_type, product)


def _product(eqn, x, w, preferred_element_type, product):
  """The contraction itself, on operands already in the compute dtype."""
  if product is not None:
    return product(x, w)
  return jnp.einsum(eqn, x, w, preferred_element_type=preferred_element_type)
