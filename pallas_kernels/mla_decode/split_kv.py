"""Split-KV ("flash-decoding") combine: merge partial softmax results over disjoint key ranges.

A row's keys are cut into K splits that run in parallel (so a small batch with a long cache
still fills the chip). Split k returns its own normalised output o_k and log-sum-exp lse_k; the
exact result over all keys is the lse-weighted average

    lse = log sum_k exp(lse_k),     o = sum_k exp(lse_k - lse) o_k.

A split that saw no valid key has lse_k = -inf and must report o_k = 0; it then gets weight 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def combine_splits(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """out [K, ..., C] (float32), lse [K, ...] -> (out [..., C] float32, lse [...]).

  One split (K = 1) is already the result: returned as is, in its own dtype."""
  if out.shape[0] == 1:
    return out[0], lse[0]
  peak = jnp.max(lse, axis=0)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)  # all splits empty: weights 0, not NaN
  weights = jnp.exp(lse - peak)  # [K, ...]
  total = jnp.sum(weights, axis=0)
  combined = jnp.einsum("K...,K...C->...C", weights, out.astype(jnp.float32))
  return combined / total[..., None], peak + jnp.log(total)
