"""Attention shared pieces and the MHA / GQA baselines used to ablate MLA.

Axis legend: B batch, T query length, S key length (cache slots), D d_model, N query heads,
K key/value heads (GQA groups; K = N for MHA), G = N / K, H qk head dim, V value head dim,
Q q_lora_rank.

Cache convention: slot j of a cache row holds the token at position j. A row's prefill writes
slots [0, T) and each decode step writes slot ``cache_index[b]``; a query at position p attends
the slots j <= p, which are exactly the slots this row has written, so stale slots past a row's
length are never read. Caches are stacked over layers and a layer sees them through a
``CacheView``, which scatters only the new tokens into the stacked arrays: inside the decode
loop that is an in-place update, never a copy of the cache. Softmax is always in float32.

Kernels: ``attention_impl`` ("auto" | "xla" | "pallas") picks XLA einsums or the Pallas flash
attention kernel (pallas_kernels/flash_attention) for attention without a cache (training,
packed prefill); "auto" means the kernel on TPU and GPU. Under a mesh the kernel runs per shard
(``jax.shard_map``): batch over the batch axes, heads over "tensor".
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model.layers import RMSNorm, normal_param
from deepseek_jax.model.rope import RotaryEmbedding
from deepseek_jax.parallel.mesh import BATCH_AXES, target_platform
from deepseek_jax.parallel.partitioning import logical_to_spec
from pallas_kernels.flash_attention.ops import flash_attention


class KVCache(NamedTuple):
  """Expanded per-head cache: what MHA/GQA (and MLA without latent caching) must keep."""

  k: jax.Array  # [B, S, K, H]
  v: jax.Array  # [B, S, K, V]

  @classmethod
  def zeros(cls, batch: int, max_len: int, kv_heads: int, qk_dim: int, v_dim: int,
            dtype) -> "KVCache":
    return cls(jnp.zeros((batch, max_len, kv_heads, qk_dim), dtype),
               jnp.zeros((batch, max_len, kv_heads, v_dim), dtype))


class CacheView(NamedTuple):
  """Layer ``layer``'s window into a cache stacked over layers (arrays [L, B, S, ...])."""

  stacked: Any  # a KVCache or LatentCache whose arrays carry a leading layer axis
  layer: jax.Array  # scalar int

  def write(self, new, start: jax.Array) -> "CacheView":
    """Scatter ``new`` (same cache type, arrays [B, T, ...]) at per-row slots start [B] onward."""
    batch, length = jax.tree.leaves(new)[0].shape[:2]
    rows = jnp.arange(batch)[:, None]
    slots = start[:, None] + jnp.arange(length)[None]
    stacked = jax.tree.map(lambda buf, x: buf.at[self.layer, rows, slots].set(x.astype(buf.dtype)),
                           self.stacked, new)
    return CacheView(stacked, self.layer)

  def read(self):
    """This layer's cache, arrays [B, S, ...], in the same cache type."""
    return jax.tree.map(lambda buf: buf[self.layer], self.stacked)


def attention_mask(q_pos: jax.Array, kv_pos: jax.Array, q_segment: Optional[jax.Array] = None,
                   kv_segment: Optional[jax.Array] = None) -> jax.Array:
  """Causal (and same-segment, for packed sequences) mask [B, 1, T, S]."""
  mask = kv_pos[:, None, :] <= q_pos[:, :, None]
  if q_segment is not None:
    mask &= q_segment[:, :, None] == kv_segment[:, None, :]
  return mask[:, None]


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis in float32; masked entries get probability exactly 0."""
  scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) v with grouped heads: q [B,T,N,H], k [B,S,K,H], v [B,S,K,V]."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  if kv_heads == n:  # MHA / expanded MLA: plain 4-D contractions, no group axis to transpose
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * scale
    probs = masked_softmax(scores, mask)
    return jnp.einsum("BNTS,BSNV->BTNV", probs.astype(v.dtype), v)
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
  probs = masked_softmax(scores, mask[:, :, None])
  out = jnp.einsum("BKGTS,BSKV->BTKGV", probs.astype(v.dtype), v)
  return out.reshape(b, t, n, v.shape[-1])


def self_attention_mask(positions, segment_ids, cache_len: Optional[int]) -> jax.Array:
  """The mask for keys = current tokens (cache_len None) or = all cache slots.

  Without a cache, causality follows the token index, not ``positions``: positions only drive
  RoPE, so packed rows with restarting positions cannot see later tokens (segment ids then
  keep documents apart). With a cache, a query's position is its slot (see module docstring).
  """
  batch = positions.shape[0]
  if cache_len is None:
    index = jnp.broadcast_to(jnp.arange(positions.shape[1]), positions.shape)
    return attention_mask(index, index, segment_ids, segment_ids)
  slots = jnp.broadcast_to(jnp.arange(cache_len), (batch, cache_len))
  return attention_mask(positions, slots)


def uses_kernels(attention_impl: str, sharded: bool = True) -> bool:
  """Whether ``attention_impl`` means Pallas kernels for the platform being compiled for.

  ``sharded=False``: only without a multi-device context mesh (the decode kernel has no
  per-shard wrapper yet, and XLA cannot partition a Pallas call).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not sharded and not mesh.empty and mesh.size > 1:
    return False
  if attention_impl == "auto":
    return target_platform() in ("tpu", "gpu")
  return attention_impl == "pallas"


# How activations around a Pallas call are split (a kernel runs per shard, on whole heads).
_KERNEL_RULES = {"batch": BATCH_AXES, "heads": "tensor"}


def per_shard(fn, logical_axes, *args):
  """``fn(*args)`` per shard of the context mesh: XLA cannot partition a Pallas call.

  ``logical_axes[i]`` names arg i's dims ("batch", "heads" or None); they split as the
  partitioning rules split them (batch over the batch axes, heads over "tensor", a dim its mesh
  axes do not divide stays whole). The output is laid out like ``args[0]``. Without a
  multi-device mesh this is ``fn(*args)``.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  specs = tuple(logical_to_spec(axes, _KERNEL_RULES, mesh, arg.shape)
                for axes, arg in zip(logical_axes, args))
  return jax.shard_map(fn, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)


def causal_self_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          segment_ids: Optional[jax.Array], scale: float,
                          attention_impl: str) -> jax.Array:
  """Attention among the current tokens only (no cache): causal by token index and, for packed
  rows, within segments. q [B,T,N,H], k [B,T,K,H], v [B,T,K,V] -> [B,T,N,V]."""
  if not uses_kernels(attention_impl):
    index = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    return attend(q, k, v, attention_mask(index, index, segment_ids, segment_ids), scale)
  if k.shape[2] != q.shape[2]:  # GQA: the kernel takes one key/value head per query head
    k, v = (jnp.repeat(a, q.shape[2] // k.shape[2], axis=2) for a in (k, v))
  kernel = lambda q, k, v, *seg: flash_attention(q, k, v, *seg, softmax_scale=scale)
  heads = ("batch", None, "heads", None)
  args, axes = (q, k, v), (heads,) * 3
  if segment_ids is not None:
    args, axes = args + (segment_ids,), axes + (("batch", None),)
  return per_shard(kernel, axes, *args)


class QueryProjection(nnx.Module):
  """q = W_UQ RMSNorm(W_DQ h) with query compression (d_c' = q_lora_rank), else q = W_Q h."""

  def __init__(self, d_model: int, n_heads: int, head_dim: int, q_lora_rank: Optional[int], *,
               eps: float, init_std: float, dtype: str, param_dtype: str, rngs: nnx.Rngs):
    kw = dict(std=init_std, param_dtype=param_dtype)
    if q_lora_rank:
      self.wq_a = normal_param(rngs, (d_model, q_lora_rank), ("embed", "q_lora"), **kw)
      self.q_norm = RMSNorm(q_lora_rank, eps=eps, param_dtype=param_dtype)
      self.wq_b = normal_param(rngs, (q_lora_rank, n_heads, head_dim),
                               ("q_lora", "heads", "head_dim"), **kw)
      self.wq = None
    else:
      self.wq_a = self.q_norm = self.wq_b = None
      self.wq = normal_param(rngs, (d_model, n_heads, head_dim), ("embed", "heads", "head_dim"),
                             **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    if self.wq is not None:
      return jnp.einsum("BTD,DNH->BTNH", x, self.wq[...].astype(self.dtype))
    c_q = self.q_norm(jnp.einsum("BTD,DQ->BTQ", x, self.wq_a[...].astype(self.dtype)))
    return jnp.einsum("BTQ,QNH->BTNH", c_q, self.wq_b[...].astype(self.dtype))


class GroupedQueryAttention(nnx.Module):
  """MHA (K = N) and GQA baselines: per-head keys/values, RoPE on each head's trailing R dims.

  Same head dims as the MLA it replaces (qk = d_h + d_R, v = d_v), so an ablation changes only
  how keys and values are produced and cached: K * (d_h + d_R + d_v) values per token per layer.
  """

  def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, q_lora_rank: Optional[int],
               qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, *,
               rotary: RotaryEmbedding, softmax_scale: float, attention_impl: str = "auto",
               eps: float, init_std: float, dtype: str, param_dtype: str, rngs: nnx.Rngs):
    qk = qk_nope_head_dim + qk_rope_head_dim
    kw = dict(std=init_std, param_dtype=param_dtype)
    self.query = QueryProjection(d_model, n_heads, qk, q_lora_rank, eps=eps, init_std=init_std,
                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wk = normal_param(rngs, (d_model, n_kv_heads, qk), ("embed", "kv_heads", "head_dim"), **kw)
    self.wv = normal_param(rngs, (d_model, n_kv_heads, v_head_dim),
                           ("embed", "kv_heads", "head_dim"), **kw)
    self.wo = normal_param(rngs, (n_heads, v_head_dim, d_model), ("heads", "head_dim", "embed"),
                           **kw)
    self.rotary = rotary
    self.nope_dim = qk_nope_head_dim
    self.scale = softmax_scale
    self.attention_impl = attention_impl
    self.dtype = dtype

  def _rope_tail(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    return jnp.concatenate([x[..., :self.nope_dim], self.rotary(x[..., self.nope_dim:], positions)],
                           axis=-1)

  def __call__(self, x, positions, *, segment_ids=None, cache: Optional[CacheView] = None,
               cache_index=None, absorb: bool = False):
    if absorb:
      raise ValueError("absorb=True is an MLA decoding path; MHA/GQA have nothing to absorb")
    if cache is not None and not isinstance(cache.stacked, KVCache):
      raise ValueError(f"MHA/GQA cache must be a KVCache, got {type(cache.stacked).__name__}")
    x = x.astype(self.dtype)
    q = self._rope_tail(self.query(x), positions)
    k = self._rope_tail(jnp.einsum("BTD,DKH->BTKH", x, self.wk[...].astype(self.dtype)), positions)
    v = jnp.einsum("BTD,DKV->BTKV", x, self.wv[...].astype(self.dtype))
    if cache is None:
      out = causal_self_attention(q, k, v, segment_ids, self.scale, self.attention_impl)
    else:
      cache = cache.write(KVCache(k, v), cache_index)
      k, v = (a.astype(self.dtype) for a in cache.read())
      out = attend(q, k, v, self_attention_mask(positions, None, k.shape[1]), self.scale)
    return jnp.einsum("BTNV,NVD->BTD", out, self.wo[...].astype(self.dtype)), cache
