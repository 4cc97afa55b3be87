"""Pure-JAX oracle for MLA's training/prefill attention (the expanded path), with its gradients.

Axis legend: B batch, T query length, S key length (= T: self-attention), N heads,
H = d_qk (d_h + d_R = 192 for V2/V3), V = d_v (128): d_qk and d_v differ in general.

    s = scale * q k^T,  masked where key j > query i (causal, by token index) or where the
        segment ids differ (packed sequences);   o = softmax(s) v,   lse = log sum exp(s).

Every query sees at least itself, so no row is fully masked. Scores and softmax are float32;
``out`` is returned in q's dtype, lse in float32. Gradients are those of plain XLA autodiff.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                        segment_ids: Optional[jax.Array] = None, *, softmax_scale: float,
                        causal: bool = True) -> tuple[jax.Array, jax.Array]:
  """q [B,T,N,H], k [B,S,N,H], v [B,S,N,V], segment_ids [B,T] -> (out [B,T,N,V], lse [B,N,T])."""
  t, s = q.shape[1], k.shape[1]
  scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32)
  scores = scores.astype(jnp.float32) * softmax_scale
  mask = jnp.ones((1, 1, t, s), bool)
  if causal:
    mask &= (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])[None, None]
  if segment_ids is not None:
    mask &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  scores = jnp.where(mask, scores, -jnp.inf)
  lse = jax.nn.logsumexp(scores, axis=-1)
  probs = jnp.exp(scores - lse[..., None])
  out = jnp.einsum("BNTS,BSNV->BTNV", probs, v.astype(jnp.float32))
  return out.astype(q.dtype), lse
