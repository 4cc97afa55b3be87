"""Multi-Token Prediction (DeepSeek-V3 §2.2).

Axis legend: B batch, T length, D d_model.

How it works
------------
Module k (k = 1..D) at position i sees the previous depth's representation h^{k-1}_i and the
embedding of token t_{i+k}, and predicts t_{i+k+1}:

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]      (M_k: 2D -> D, "eh_proj")
    h^k    = TRM_k(h'^k)                                           (a full transformer block)
    P^k_{i+k+1} = OutHead(RMSNorm_k(h^k_i))                        (embedding and head shared)

h^0 is the main model's final normed hidden state and each depth hands RMSNorm_k(h^k) to the
next, the representation its head reads (as vLLM's DeepSeek MTP does). The concatenation order
is [embedding; hidden], the order of the released V3 weights (``enorm``, ``hnorm``,
``eh_proj``; the paper writes the other order). Loss: L_MTP = (lambda / D) sum_k CE_k.

Targets: with inputs x and next-token targets y (y_i = x_{i+1}), t_{i+k} = y_{i+k-1} and
t_{i+k+1} = y_{i+k}; position i is scored only if y_{i+k} is a real target in the same
packed segment as i (whether y_i itself is scored does not matter: prompt masking in SFT
still leaves the depth-k targets that fall in the answer).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model.attention import CacheView
from deepseek_jax.model.layers import RMSNorm, normal_param
from deepseek_jax.ops.matmul import BF16, MatmulFormat, weight_matmul


def shift_left(x: jax.Array, k: int, fill=0) -> jax.Array:
  """x[:, i + k] at position i; the last k positions get ``fill``."""
  if k == 0:
    return x
  pad = jnp.full((x.shape[0], k) + x.shape[2:], fill, x.dtype)
  return jnp.concatenate([x[:, k:], pad], axis=1)


def mtp_targets(targets: jax.Array, mask: jax.Array, segment_ids: Optional[jax.Array], k: int):
  """For depth k: (input tokens t_{i+k}, targets t_{i+k+1}, mask) all [B, T]."""
  inputs_k = shift_left(targets, k - 1)
  targets_k = shift_left(targets, k)
  mask_k = shift_left(mask, k)
  if segment_ids is not None:
    same_segment = shift_left(segment_ids, k, fill=-1) == segment_ids
    mask_k = mask_k * same_segment.astype(mask_k.dtype)
  return inputs_k, targets_k, mask_k


class MTPModule(nnx.Module):
  """One prediction depth: two norms, the 2D -> D projection, a block, and its output norm."""

  def __init__(self, block: nnx.Module, d_model: int, *, eps: float, init_std: float,
               dtype: str, param_dtype: str, rngs: nnx.Rngs, matmul_format: MatmulFormat = BF16):
    self.enorm = RMSNorm(d_model, eps=eps, param_dtype=param_dtype)
    self.hnorm = RMSNorm(d_model, eps=eps, param_dtype=param_dtype)
    self.eh_proj = normal_param(rngs, (2 * d_model, d_model), ("mlp", "embed"), std=init_std,
                                param_dtype=param_dtype)
    self.block = block
    self.norm = RMSNorm(d_model, eps=eps, param_dtype=param_dtype)
    self.dtype = dtype
    self.matmul_format = matmul_format  # the projection's; its norms stay float32

  def decode(self, h_prev, token_embedding, positions, *, cache, cache_index, absorb=False):
    """With a cache (speculative decoding): h_prev [B,T,D] (h^{k-1}), token_embedding [B,T,D]
    (Emb(t_{i+k})), positions [B,T] int32; ``cache`` is this module's layer-stacked cache with
    a leading axis of 1 (``transformer.init_mtp_caches``); the T positions are written at
    per-row slots ``cache_index`` [B] onward and attend over every slot <= their position.
    Returns (RMSNorm_k(h^k) [B,T,D] in the activation dtype, the updated cache)."""
    joined = jnp.concatenate([self.enorm(token_embedding), self.hnorm(h_prev)], axis=-1)
    x = weight_matmul("BTE,ED->BTD", joined, self.eh_proj, dtype=self.dtype,
                      fmt=self.matmul_format)
    h, view, _ = self.block(x, positions, cache=CacheView(cache, jnp.int32(0)),
                            cache_index=cache_index, absorb=absorb)
    return self.norm(h), view.stacked

  def __call__(self, h_prev, token_embedding, positions, *, segment_ids=None, mask=None):
    """Returns (RMSNorm_k(h^k) [B,T,D]: for the head and the next depth, MoE stats)."""
    joined = jnp.concatenate([self.enorm(token_embedding), self.hnorm(h_prev)], axis=-1)
    x = weight_matmul("BTE,ED->BTD", joined, self.eh_proj, dtype=self.dtype,
                      fmt=self.matmul_format)
    h, _, stats = self.block(x, positions, segment_ids=segment_ids, mask=mask)
    return self.norm(h), stats
