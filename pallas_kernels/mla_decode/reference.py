"""Pure-JAX oracle for MLA decoding over the latent cache (FlashMLA's "MQA mode").

Axis legend: B batch, T query tokens per row (s_q), N query heads, C = d_c (latent width),
R = d_R (shared rotary key width), S cache slots, P pages, G page size, M pages per row.

With W_UK absorbed into the query (model/mla.py), every head attends one shared "KV head": the
key of slot j is [c_KV_j; k_R_j] (C + R = 576 values for V2/V3) and its value is c_KV_j:

    s[b,t,n,j] = scale * (q[b,t,n,:C] . c_KV[b,j] + q[b,t,n,C:] . k_R[b,j])
    o[b,t,n]   = sum_j softmax_j(s) c_KV[b,j],      lse[b,t,n] = log sum_j exp(s[b,t,n,j])

Row b holds ``lengths[b]`` valid slots, the T new tokens included (they sit in the last T valid
slots). With ``causal``, query t sees slots j < lengths[b] - T + t + 1 (speculative tokens see
their predecessors, not their successors); without it every query sees all valid slots. Slots at
or past a row's length may hold anything, NaN included: they are masked out of the scores and
zeroed out of the values, so they never reach the result. Scores, softmax and the output sum are
float32; the output is returned in the query dtype, lse in float32.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def paged_shape_error(q_shape, c_pages_shape, r_pages_shape, block_table_shape) -> Optional[str]:
  """Why these shapes break the paged-cache contract above (None when they keep it): the
  checks every kernel's ``unsupported_reason`` starts with."""
  if len(q_shape) != 4 or len(c_pages_shape) != 3 or len(r_pages_shape) != 3:
    return "expects q [B,T,N,C+R], c_pages [P,G,C], r_pages [P,G,R]"
  if len(block_table_shape) != 2 or block_table_shape[0] != q_shape[0]:
    return "block_table must be [B, M] with q's batch"
  (pages, page, width), (pages_r, page_r, rope) = c_pages_shape, r_pages_shape
  if (pages, page) != (pages_r, page_r):
    return "c_pages and r_pages disagree on the number or size of pages"
  if q_shape[-1] != width + rope:
    return f"q width {q_shape[-1]} disagrees with C + R = {width} + {rope}"
  return None


def gather_pages(pages: jax.Array, block_table: jax.Array) -> jax.Array:
  """Paged cache [P, G, X] + block table [B, M] -> contiguous rows [B, M * G, X]."""
  rows = pages[block_table]  # [B, M, G, X]
  return rows.reshape(rows.shape[0], -1, rows.shape[-1])


def visible_limit(lengths: jax.Array, n_queries: int, causal: bool) -> jax.Array:
  """[B, T]: query t of row b sees the slots j < limit[b, t]."""
  limit = jnp.broadcast_to(lengths[:, None], (lengths.shape[0], n_queries))
  if causal:
    limit = limit - n_queries + 1 + jnp.arange(n_queries)[None]
  return limit


def mla_decode_reference(q: jax.Array, c_kv: jax.Array, k_rope: jax.Array, lengths: jax.Array,
                         block_table: Optional[jax.Array] = None, *, softmax_scale: float,
                         causal: bool = True) -> tuple[jax.Array, jax.Array]:
  """Latent attention for new tokens over a latent cache.

  q [B,T,N,C+R]; contiguous cache c_kv [B,S,C], k_rope [B,S,R], or paged cache c_kv [P,G,C],
  k_rope [P,G,R] with block_table [B,M] (row b's slot j lives in page block_table[b, j // G]);
  lengths [B] int. Returns (out [B,T,N,C] in q.dtype, lse [B,T,N] float32).
  """
  if block_table is not None:
    c_kv, k_rope = gather_pages(c_kv, block_table), gather_pages(k_rope, block_table)
  width = c_kv.shape[-1]
  n_queries, n_slots = q.shape[1], c_kv.shape[1]
  slots = jnp.arange(n_slots)
  valid = slots[None, None, :] < visible_limit(lengths, n_queries, causal)[:, :, None]  # [B,T,S]
  in_row = slots[None, :] < lengths[:, None]  # [B,S]: zero garbage values, NaN included
  c_kv = jnp.where(in_row[..., None], c_kv, 0).astype(jnp.float32)
  k_rope = jnp.where(in_row[..., None], k_rope, 0).astype(jnp.float32)
  out_dtype, q = q.dtype, q.astype(jnp.float32)
  scores = (jnp.einsum("BTNC,BSC->BTNS", q[..., :width], c_kv)
            + jnp.einsum("BTNR,BSR->BTNS", q[..., width:], k_rope)) * softmax_scale
  scores = jnp.where(valid[:, :, None, :], scores, -jnp.inf)
  lse = jax.nn.logsumexp(scores, axis=-1)
  probs = jnp.exp(scores - lse[..., None])
  out = jnp.einsum("BTNS,BSC->BTNC", probs, c_kv)
  return out.astype(out_dtype), lse
