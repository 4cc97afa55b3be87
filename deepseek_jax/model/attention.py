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

Kernels: a layer's ``attention_impl`` ("xla" | "pallas", resolved once from the config's
"auto" by ``model.execution``) picks XLA einsums or the Pallas flash attention kernel
(pallas_kernels/flash_attention) for attention without a cache (training, packed prefill).
Under a mesh the kernel runs per shard (``parallel.partitioning.per_shard``): batch over the
batch axes, heads over "tensor".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.model.layers import RMSNorm, normal_param
from deepseek_jax.model.rope import RotaryEmbedding
from deepseek_jax.ops.matmul import BF16, MatmulFormat, weight_matmul
from deepseek_jax.parallel.partitioning import per_shard
from pallas_kernels.flash_attention.ops import flash_attention

KERNEL_CHOICES = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """The shape of one attention layer, in DeepSeek-V2 §2.1's symbols.

  d_model D; n_heads n_h; qk_nope_head_dim d_h; qk_rope_head_dim d_h^R; v_head_dim d_v;
  q_lora_rank d_c' (None: no query compression); kv_lora_rank d_c (MLA's latent width; unused
  by MHA/GQA); n_kv_heads (the MHA/GQA baselines' key/value heads, n_heads for MHA);
  decoupled_rope (MLA: one shared rotary key k_R, else the rotary key part is up-projected per
  head); softmax_scale = (d_h + d_h^R)^-1/2, times mscale^2 under YaRN.
  """

  d_model: int
  n_heads: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  softmax_scale: float
  q_lora_rank: Optional[int] = None
  kv_lora_rank: int = 0
  n_kv_heads: Optional[int] = None
  decoupled_rope: bool = True

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim


def check_kernel_choice(name: str, value: str) -> str:
  """A layer's resolved kernel choice; raises ValueError for anything but "xla" / "pallas"
  (the config's "auto" is resolved by ``model.execution.resolve_execution``)."""
  if value not in KERNEL_CHOICES:
    raise ValueError(f"{name} must be one of {KERNEL_CHOICES} (resolved), got {value!r}; "
                     "resolve ModelConfig.attention_impl with model.execution.resolve_execution")
  return value


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
  if kv_heads == n:  # MHA / expanded MLA: head-major contractions, probabilities recomputed
    return _head_major_attention(q, k, v, mask, scale)
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
  probs = masked_softmax(scores, mask[:, :, None])
  out = jnp.einsum("BKGTS,BSKV->BTKGV", probs.astype(v.dtype), v)
  return out.reshape(b, t, n, v.shape[-1])


def _attention_forward(q, k, v, mask, scale):
  """softmax(q k^T * scale) v on head-major copies [B,N,T,.] (canonical batched matmuls, which
  XLA:CPU runs several times faster than the token-major forms); returns the output
  [B,T,N,V] and the residuals, which keep each row's max and sum [B,N,T,1] (not their
  log-sum-exp: for a fully masked row, min + log(S) rounds back to min), not the
  probabilities [B,N,T,S]."""
  qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  scores = jnp.einsum("BNTH,BNSH->BNTS", qt, kt, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  peak = scores.max(-1, keepdims=True)
  unnormalised = jnp.exp(scores - peak)
  total = unnormalised.sum(-1, keepdims=True)
  out = jnp.einsum("BNTS,BNSV->BNTV", (unnormalised / total).astype(v.dtype), vt)
  return jnp.swapaxes(out, 1, 2), (qt, kt, vt, mask, out, peak, total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_major_attention(q, k, v, mask, scale):
  """``attend`` for as many key/value heads as query heads, with a flash-attention-style
  backward: the probabilities are recomputed from the saved row max and sum instead of kept
  from the forward pass (a [B,N,T,S] float32 array per layer)."""
  return _attention_forward(q, k, v, mask, scale)[0]


def _head_major_attention_bwd(scale, residuals, d_out):
  qt, kt, vt, mask, out, peak, total = residuals
  scores = jnp.einsum("BNTH,BNSH->BNTS", qt, kt, preferred_element_type=jnp.float32) * scale
  probs = jnp.exp(jnp.where(mask, scores, jnp.finfo(jnp.float32).min) - peak) / total
  d_out = jnp.swapaxes(d_out, 1, 2)
  dv = jnp.einsum("BNTS,BNTV->BNSV", probs.astype(d_out.dtype), d_out,
                  preferred_element_type=jnp.float32)
  d_probs = jnp.einsum("BNTV,BNSV->BNTS", d_out, vt, preferred_element_type=jnp.float32)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
  d_scores = jnp.where(mask, probs * (d_probs - delta) * scale, 0.0)  # no gradient past the mask
  dq = jnp.einsum("BNTS,BNSH->BNTH", d_scores, kt.astype(jnp.float32))
  dk = jnp.einsum("BNTS,BNTH->BNSH", d_scores, qt.astype(jnp.float32))
  grads = [jnp.swapaxes(g, 1, 2).astype(a.dtype) for g, a in ((dq, qt), (dk, kt), (dv, vt))]
  return (*grads, np.zeros(mask.shape, jax.dtypes.float0))


_head_major_attention.defvjp(lambda q, k, v, mask, scale: _attention_forward(q, k, v, mask, scale),
                             _head_major_attention_bwd)


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


def causal_self_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          segment_ids: Optional[jax.Array], scale: float,
                          attention_impl: str) -> jax.Array:
  """Attention among the current tokens only (no cache): causal by token index and, for packed
  rows, within segments. q [B,T,N,H], k [B,T,K,H], v [B,T,K,V] -> [B,T,N,V].
  ``attention_impl``: "xla" (einsums) or "pallas" (the flash kernel, per shard under a mesh)."""
  if attention_impl != "pallas":
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
               eps: float, init_std: float, dtype: str, param_dtype: str, rngs: nnx.Rngs,
               matmul_format: MatmulFormat = BF16):
    """Weights W_DQ [D, Q] + q_norm + W_UQ [Q, N, H] with compression, else W_Q [D, N, H]."""
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
    self.matmul_format = matmul_format

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> q [B, T, N, H]."""
    kw = dict(dtype=self.dtype, fmt=self.matmul_format)
    if self.wq is not None:
      return weight_matmul("BTD,DNH->BTNH", x, self.wq, **kw)
    c_q = self.q_norm(weight_matmul("BTD,DQ->BTQ", x, self.wq_a, **kw))
    return weight_matmul("BTQ,QNH->BTNH", c_q, self.wq_b, **kw)


class GroupedQueryAttention(nnx.Module):
  """MHA (K = N) and GQA baselines: per-head keys/values, RoPE on each head's trailing R dims.

  Same head dims as the MLA it replaces (qk = d_h + d_R, v = d_v), so an ablation changes only
  how keys and values are produced and cached: K * (d_h + d_R + d_v) values per token per layer.
  """

  def __init__(self, spec: AttentionSpec, *, rotary: RotaryEmbedding, eps: float,
               init_std: float, dtype: str, param_dtype: str, rngs: nnx.Rngs,
               attention_impl: str = "xla", matmul_format: MatmulFormat = BF16):
    """``spec.n_kv_heads`` key/value heads (n_heads for MHA). ``attention_impl``: "xla" or
    "pallas" (resolved); ``matmul_format``: the projections' number format. Raises
    ValueError for an unresolved kernel choice."""
    kw = dict(std=init_std, param_dtype=param_dtype)
    n, kv, qk, v = spec.n_heads, spec.n_kv_heads or spec.n_heads, spec.qk_head_dim, spec.v_head_dim
    self.query = QueryProjection(spec.d_model, n, qk, spec.q_lora_rank, eps=eps,
                                 init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                 matmul_format=matmul_format)
    self.wk = normal_param(rngs, (spec.d_model, kv, qk), ("embed", "kv_heads", "head_dim"), **kw)
    self.wv = normal_param(rngs, (spec.d_model, kv, v), ("embed", "kv_heads", "head_dim"), **kw)
    self.wo = normal_param(rngs, (n, v, spec.d_model), ("heads", "head_dim", "embed"), **kw)
    self.rotary = rotary
    self.nope_dim = spec.qk_nope_head_dim
    self.scale = spec.softmax_scale
    self.attention_impl = check_kernel_choice("attention_impl", attention_impl)
    self.dtype = dtype
    self.matmul_format = matmul_format

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
    k = self._rope_tail(weight_matmul("BTD,DKH->BTKH", x, self.wk, dtype=self.dtype,
                                            fmt=self.matmul_format), positions)
    v = weight_matmul("BTD,DKV->BTKV", x, self.wv, dtype=self.dtype, fmt=self.matmul_format)
    if cache is None:
      out = causal_self_attention(q, k, v, segment_ids, self.scale, self.attention_impl)
    else:
      cache = cache.write(KVCache(k, v), cache_index)
      k, v = (a.astype(self.dtype) for a in cache.read())
      out = attend(q, k, v, self_attention_mask(positions, None, k.shape[1]), self.scale)
    return weight_matmul("BTNV,NVD->BTD", out, self.wo, dtype=self.dtype,
                         fmt=self.matmul_format), cache
