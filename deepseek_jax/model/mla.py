"""Multi-Head Latent Attention (DeepSeek-V2 §2.1), with the absorbed latent-cache decode path.

Axis legend: B batch, T query length, S key length (cache slots), D d_model, N heads,
H = d_h (no-rope head dim), R = d_R (rope dim), V = d_v, C = d_c (kv_lora_rank), Q = d_c'.

How it works
------------
Keys and values are generated from one small latent per token:

    c_KV = RMSNorm(h W_DKV)          [B,S,C]      the compressed latent (cached),
    k_R  = RoPE(h W_KR)              [B,S,R]      one rotary key shared by all heads (cached),
    k_n  = c_KV W_UK  [B,S,N,H],  v = c_KV W_UV  [B,S,N,V].

Expanded path (training): build k = [k_n; k_R] and v per head and run ordinary attention.

Absorbed path (decoding): since q_n . k_n = q_n . (c_KV W_UK) = (q_n W_UK^T) . c_KV, fold W_UK into
the query and attend directly over the latent cache, then apply W_UV after the softmax:

    q_lat = einsum("BTNH,CNH->BTNC", q_n, W_UK)
    s     = q_lat . c_KV + q_R . k_R                  (one shared "KV head" of width C + R = 576)
    o_lat = softmax(s * scale) . c_KV                  [B,T,N,C]
    out   = einsum("BTNC,CNV->BTNV", o_lat, W_UV) W_O

so a decode step reads (C + R) values per cached token per layer instead of N (H + R + V).
This works only because RoPE is kept off k_n: a position-dependent rotation between q_n and W_UK
would block the absorption. ``decoupled_rope=False`` is that ablation: each head's rotary key
part is up-projected from c_KV (k = RoPE(c_KV W_UK)), nothing is shared, and decoding must
re-expand the latents (``absorb=False``) or keep an expanded cache.

Caches: ``LatentCache`` (c_KV, k_R) for the absorbed path, ``KVCache`` (per-head k, v) for the
expanded one. ``absorb`` selects the attention path; the cache type selects what is stored.

Kernels (resolved once by ``model.execution``): with ``attention_impl="pallas"`` the expanded
path without a cache runs the Pallas flash attention kernel (d_qk = H + R differs from d_v); with
``decode_impl="pallas"`` decoding 1 or 2 tokens per row (2 = MTP speculative verification) on
the absorbed path runs the Pallas MLA decode kernel, which reads the layer-stacked latent cache
in place as 64-slot pages (no copy of the layer's cache).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model.attention import (AttentionSpec, CacheView, KVCache, QueryProjection,
                                          attend, causal_self_attention, check_kernel_choice,
                                          masked_softmax, self_attention_mask)
from deepseek_jax.model.layers import RMSNorm, normal_param
from deepseek_jax.model.rope import RotaryEmbedding
from deepseek_jax.ops.matmul import BF16, MatmulFormat, weight_matmul
from pallas_kernels.mla_decode.ops import PAGE_SIZE, contiguous_as_pages, mla_decode


class LatentCache(NamedTuple):
  """MLA's cache: C + R values per token per layer (576 for V2/V3), FlashMLA's "MQA mode"."""

  c_kv: jax.Array  # [B, S, C]
  k_rope: jax.Array  # [B, S, R] (R = 0 without decoupled RoPE)

  @classmethod
  def zeros(cls, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype) -> "LatentCache":
    return cls(jnp.zeros((batch, max_len, kv_lora_rank), dtype),
               jnp.zeros((batch, max_len, rope_dim), dtype))


def stacked_pages(view: CacheView):
  """A layer-stacked LatentCache ([L,B,S,.]) seen as pages [L*B*M, G, .] (a free reshape) and
  the block table [B, M] of layer ``view.layer``'s rows; None if S is not a multiple of G."""
  c_kv, k_rope = view.stacked
  batch, slots = c_kv.shape[1:3]
  if slots % PAGE_SIZE:
    return None
  return contiguous_as_pages(c_kv, k_rope, first_row=view.layer * batch, n_rows=batch)


class MultiHeadLatentAttention(nnx.Module):
  """Multi-Head Latent Attention (V2 §2.1): keys and values from one cached latent per token.

  Weights: the query projection (``QueryProjection``), W_DKV and W_KR fused as ``wkv_a``
  [D, C + R] (HF ``kv_a_proj_with_mqa``), ``kv_norm`` on c_KV, W_UK ``w_uk`` [C, N, H] and
  W_UV ``w_uv`` [C, N, V] (HF ``kv_b_proj``), W_O ``wo`` [N, V, D]. ``__call__`` runs the
  expanded path (training, expanded caches) or the absorbed path over a ``LatentCache``
  (decoding); see the module docstring for the formulas and the kernel choices.
  """

  def __init__(self, spec: AttentionSpec, *, rotary: RotaryEmbedding, eps: float,
               init_std: float, dtype: str, param_dtype: str, rngs: nnx.Rngs,
               attention_impl: str = "xla", decode_impl: str = "xla",
               matmul_format: MatmulFormat = BF16):
    """``spec`` gives the shapes (``kv_lora_rank`` > 0); ``attention_impl`` / ``decode_impl``
    are the resolved kernel choices ("xla" | "pallas"); ``matmul_format`` is the projections'
    number format (the absorbed per-head products stay in ``dtype``, as in V3's inference).
    Raises ValueError for an unresolved kernel choice."""
    kw = dict(std=init_std, param_dtype=param_dtype)
    d, n, c = spec.d_model, spec.n_heads, spec.kv_lora_rank
    self.decoupled_rope = spec.decoupled_rope
    self.nope_dim, self.rope_dim = spec.qk_nope_head_dim, spec.qk_rope_head_dim
    shared_rope = spec.qk_rope_head_dim if spec.decoupled_rope else 0
    per_head_key = spec.qk_nope_head_dim + (0 if spec.decoupled_rope else spec.qk_rope_head_dim)
    self.query = QueryProjection(d, n, spec.qk_head_dim, spec.q_lora_rank, eps=eps,
                                 init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                 matmul_format=matmul_format)
    self.wkv_a = normal_param(rngs, (d, c + shared_rope), ("embed", "kv_lora"), **kw)
    self.kv_norm = RMSNorm(c, eps=eps, param_dtype=param_dtype)
    self.w_uk = normal_param(rngs, (c, n, per_head_key), ("kv_lora", "heads", "head_dim"), **kw)
    self.w_uv = normal_param(rngs, (c, n, spec.v_head_dim), ("kv_lora", "heads", "head_dim"), **kw)
    self.wo = normal_param(rngs, (n, spec.v_head_dim, d), ("heads", "head_dim", "embed"), **kw)
    self.kv_lora_rank = c
    self.rotary = rotary
    self.scale = spec.softmax_scale
    self.attention_impl = check_kernel_choice("attention_impl", attention_impl)
    self.decode_impl = check_kernel_choice("decode_impl", decode_impl)
    self.dtype = dtype
    self.matmul_format = matmul_format

  def _matmul(self, eqn: str, x: jax.Array, name: str, absorbed: bool = False) -> jax.Array:
    """A projection in the layer's number format; ``absorbed``: a per-head product of the
    absorbed path (batched over heads), kept in ``dtype``."""
    fmt = BF16 if absorbed else self.matmul_format
    return weight_matmul(eqn, x, getattr(self, name), dtype=self.dtype, fmt=fmt)

  def latents(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """c_KV [B,T,C] (normalised) and the shared rotary key k_R [B,T,R] (rotated)."""
    kv = self._matmul("BTD,DC->BTC", x, "wkv_a")
    c_kv = self.kv_norm(kv[..., :self.kv_lora_rank])
    k_rope = kv[..., self.kv_lora_rank:]
    if self.decoupled_rope:
      k_rope = self.rotary(k_rope, positions)
    return c_kv, k_rope

  def expand(self, c_kv: jax.Array, k_rope: jax.Array, key_positions: jax.Array):
    """Per-head keys [B,S,N,H+R] and values [B,S,N,V] from latents (the expanded path)."""
    k = self._matmul("BSC,CNH->BSNH", c_kv, "w_uk")
    v = self._matmul("BSC,CNV->BSNV", c_kv, "w_uv")
    if self.decoupled_rope:
      k_r = jnp.broadcast_to(k_rope[:, :, None, :], k.shape[:3] + (self.rope_dim,))
      k = jnp.concatenate([k, k_r.astype(k.dtype)], axis=-1)
    else:  # coupled ablation: the rotary part of each head's key comes from c_KV
      k = jnp.concatenate([k[..., :self.nope_dim], self.rotary(k[..., self.nope_dim:],
                                                               key_positions)], axis=-1)
    return k, v

  def __call__(self, x, positions, *, segment_ids=None, cache: Optional[CacheView] = None,
               cache_index=None, absorb: bool = False):
    """x [B,T,D], positions [B,T] -> (y [B,T,D], updated cache view or None)."""
    expanded_cache = cache is not None and isinstance(cache.stacked, KVCache)
    if absorb and not self.decoupled_rope:
      raise ValueError("absorb=True needs decoupled_rope=True: RoPE on up-projected keys "
                       "cannot be folded into the query (use absorb=False or a KVCache)")
    if absorb and expanded_cache:
      raise ValueError("absorb=True attends over latents; pass a LatentCache, not a KVCache")
    x = x.astype(self.dtype)
    q = self.query(x)
    q_nope, q_rope = q[..., :self.nope_dim], self.rotary(q[..., self.nope_dim:], positions)
    c_kv, k_rope = self.latents(x, positions)

    if expanded_cache:  # store per-head k, v for the new tokens, attend over all slots
      cache = cache.write(KVCache(*self.expand(c_kv, k_rope, positions)), cache_index)
      k, v = (a.astype(self.dtype) for a in cache.read())
      mask = self_attention_mask(positions, None, k.shape[1])
      out = attend(jnp.concatenate([q_nope, q_rope], -1), k, v, mask, self.scale)
      return self._output(out), cache

    if cache is None:  # keys are the current tokens
      if absorb:
        mask = self_attention_mask(positions, segment_ids, None)
        return self._output(self._absorbed(q_nope, q_rope, c_kv, k_rope, mask)), None
      k, v = self.expand(c_kv, k_rope, positions)
      out = causal_self_attention(jnp.concatenate([q_nope, q_rope], -1), k, v, segment_ids,
                                  self.scale, self.attention_impl)
      return self._output(out), None

    cache = cache.write(LatentCache(c_kv, k_rope), cache_index)  # keys: every cached latent
    kernel = absorb and x.shape[1] <= 2 and self.decode_impl == "pallas"
    pages = stacked_pages(cache) if kernel else None
    if pages is not None:  # decode / MTP verification: the Pallas kernel
      q_lat = self._matmul("BTNH,CNH->BTNC", q_nope, "w_uk", absorbed=True)
      q_cat = jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], -1).astype(pages[0].dtype)
      o_lat, _ = mla_decode(q_cat, *pages[:2], cache_index + x.shape[1], pages[2],
                            softmax_scale=self.scale)
      out = self._matmul("BTNC,CNV->BTNV", o_lat, "w_uv", absorbed=True)
      return self._output(out), cache
    c_kv, k_rope = (a.astype(self.dtype) for a in cache.read())
    mask = self_attention_mask(positions, None, c_kv.shape[1])
    if absorb:
      out = self._absorbed(q_nope, q_rope, c_kv, k_rope, mask)
    else:
      slots = jnp.broadcast_to(jnp.arange(c_kv.shape[1]), c_kv.shape[:2])
      k, v = self.expand(c_kv, k_rope, slots)
      out = attend(jnp.concatenate([q_nope, q_rope], -1), k, v, mask, self.scale)
    return self._output(out), cache

  def _absorbed(self, q_nope, q_rope, c_kv, k_rope, mask) -> jax.Array:
    q_lat = self._matmul("BTNH,CNH->BTNC", q_nope, "w_uk", absorbed=True)
    scores = (jnp.einsum("BTNC,BSC->BNTS", q_lat, c_kv, preferred_element_type=jnp.float32)
              + jnp.einsum("BTNR,BSR->BNTS", q_rope, k_rope, preferred_element_type=jnp.float32))
    probs = masked_softmax(scores * self.scale, mask)
    o_lat = jnp.einsum("BNTS,BSC->BTNC", probs.astype(self.dtype), c_kv)
    return self._matmul("BTNC,CNV->BTNV", o_lat, "w_uv", absorbed=True)

  def _output(self, out: jax.Array) -> jax.Array:
    return self._matmul("BTNV,NVD->BTD", out, "wo")
