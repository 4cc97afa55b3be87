"""MLA decode over a paged latent cache: a Pallas TPU (Mosaic) kernel.

Axis legend: B batch, T query tokens per row (s_q), N query heads, C = d_c (latent width),
R = d_R (shared rotary key width), P pages, G page size, M pages per row (block-table width),
K KV splits, X query rows of one block (heads x queries), S cache slots.

How this works. With W_UK absorbed into the query every head attends the same single "KV head",
so the N heads and the T new tokens of a row are the rows X = N*T of one matmul against each
page of the row's cache (reference.py gives the exact semantics):

    s[x, j] = scale * (q_c[x] . c_KV[j] + q_r[x] . k_R[j])        (f32 accumulation)
    o[x]    = sum_j softmax_j(s[x]) c_KV[j],      lse[x] = log sum_j exp(s[x, j])

- Grid (B, N / block_h, K, pages per split). The block table and the lengths are scalar-prefetched
  into SMEM; the page BlockSpecs' index_map looks up the physical page of the current logical
  page. Logical pages past a row's last valid page are clamped to that page: the block index
  repeats, so Pallas issues no new DMA and unspecified block-table entries are never read. The
  body skips (pl.when) those steps.
- Online softmax over the pages of a split: running max m, normaliser l and accumulator acc live
  in f32 VMEM scratch. Scores of slots at or past the row's length (or past a query's causal
  limit, length - T + t + 1) are set to -inf with a select, and the value rows of slots past the
  length are zeroed, so NaN garbage in a half-filled page cannot leak through P.V (0 * NaN).
- Split-KV (flash-decoding): split k covers logical pages [k*pps, (k+1)*pps), pps = cdiv(M, K).
  Each split writes its normalised float32 output and lse (-inf and 0 when it saw no slot);
  split_kv.combine_splits merges them. K = 1 writes the final output in q.dtype directly.

Query rows are laid out head-major, x = n*T + t, so a block of block_h heads is a contiguous
slice of block_h*T rows and query t of row x is x % T.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mla_decode.reference import paged_shape_error
from pallas_kernels.mla_decode.split_kv import combine_splits

# Scalar-prefetched int32 words live in SMEM; keep the block table well inside it.
_MAX_TABLE_WORDS = 1 << 16
_SUBLANES = 8


def unsupported_reason(q_shape, c_pages_shape, r_pages_shape,
                       block_table_shape) -> Optional[str]:
  """None if the kernel handles these shapes, else a short reason (callers fall back to XLA)."""
  error = paged_shape_error(q_shape, c_pages_shape, r_pages_shape, block_table_shape)
  if error is not None:
    return error
  (_, page, lat) = c_pages_shape
  if page % _SUBLANES:
    return f"page size {page} is not a multiple of {_SUBLANES}"
  if lat % 128:
    return f"latent width C = {lat} is not a multiple of 128 lanes"
  if q_shape[0] * block_table_shape[1] > _MAX_TABLE_WORDS:
    return f"block table of {q_shape[0] * block_table_shape[1]} entries is too large for SMEM"
  return None


def _check_block_h(n_heads: int, n_queries: int, block_h: Optional[int]) -> int:
  block_h = n_heads if block_h is None else block_h
  if n_heads % block_h:
    raise ValueError(f"block_h={block_h} must divide the {n_heads} heads")
  if block_h != n_heads and (block_h * n_queries) % _SUBLANES:
    raise ValueError(f"block_h * T = {block_h * n_queries} rows must be a multiple of "
                     f"{_SUBLANES} (or block_h = N)")
  return block_h


def _decode_kernel(lengths_ref, table_ref, qc_ref, qr_ref, c_ref, r_ref, out_ref, lse_ref,
                   m_ref, l_ref, acc_ref, *, scale: float, causal: bool, n_queries: int,
                   pages_per_split: int):
  """One (row b, head block, split k, page p) step of the online softmax.

  Blocks: qc [X, C], qr [X, R], c [G, C], r [G, R]; out [X, C]; lse [X, 1];
  scratch m, l [X, 1] and acc [X, C], all float32.
  """
  b, k, p = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  length = lengths_ref[b]
  page = k * pages_per_split + p
  rows, page_size = qc_ref.shape[0], c_ref.shape[0]

  @pl.when(p == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(page * page_size < length)
  def _accumulate():
    start = page * page_size
    c_kv = c_ref[...]
    # Slots past the length may hold NaN: zero them before they meet any probability.
    in_row = start + jax.lax.broadcasted_iota(jnp.int32, (page_size, 1), 0) < length
    c_kv = jnp.where(in_row, c_kv, jnp.zeros_like(c_kv))
    # Explicit precision: a global "highest" default makes Mosaic reject bf16 operands, and f32
    # caches deserve full f32 products rather than one bf16 pass.
    dot = functools.partial(
        jax.lax.dot_general, preferred_element_type=jnp.float32,
        precision=(jax.lax.Precision.HIGHEST if c_kv.dtype == jnp.float32
                   else jax.lax.Precision.DEFAULT))
    contract_last = (((1,), (1,)), ((), ()))  # "XC,GC->XG"
    q_c, q_r = qc_ref[...].astype(c_kv.dtype), qr_ref[...].astype(r_ref.dtype)
    scores = (dot(q_c, c_kv, contract_last) + dot(q_r, r_ref[...], contract_last)) * scale
    slot = start + jax.lax.broadcasted_iota(jnp.int32, (rows, page_size), 1)
    limit = length
    if causal and n_queries > 1:
      # lax.rem, not %: the rows are non-negative and jnp's floor-mod needs sign().
      query = jax.lax.rem(jax.lax.broadcasted_iota(jnp.int32, (rows, page_size), 0), n_queries)
      limit = length - n_queries + 1 + query
    scores = jnp.where(slot < limit, scores, -jnp.inf)  # a select: NaN scores do not survive

    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
    # A query with no visible slot yet keeps m = -inf: shift by 0, not inf - inf, so l and acc stay
    # finite (a causal query can find its split's first page fully hidden: its newest slots).
    shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    probs = jnp.exp(scores - shift)  # [X, G] f32, exactly 0 where masked
    rescale = jnp.exp(m_prev - shift)
    l_ref[...] = rescale * l_ref[...] + jnp.sum(probs, axis=1, keepdims=True)
    acc_ref[...] = rescale * acc_ref[...] + dot(
        probs.astype(c_kv.dtype), c_kv, (((1,), (0,)), ((), ())))  # "XG,GC->XC"
    m_ref[...] = m_next

  @pl.when(p == pages_per_split - 1)
  def _finish():
    total = l_ref[...]
    seen = total > 0.0  # false for a split (or causal query) with no visible slot
    safe = jnp.where(seen, total, 1.0)
    out_ref[...] = jnp.where(seen, acc_ref[...] / safe, 0.0).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(safe), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("softmax_scale", "causal", "num_splits", "block_h",
                                             "interpret"))
def mla_decode(q: jax.Array, c_pages: jax.Array, r_pages: jax.Array, lengths: jax.Array,
               block_table: jax.Array, *, softmax_scale: float, causal: bool = True,
               num_splits: int = 1, block_h: Optional[int] = None,
               interpret: Union[bool, pltpu.InterpretParams] = False
               ) -> tuple[jax.Array, jax.Array]:
  """Latent attention of T new tokens per row over a paged latent cache (reference.py semantics).

  q [B,T,N,C+R]; c_pages [P,G,C], r_pages [P,G,R]; lengths [B] int (valid slots, the T new tokens
  included, 1 <= lengths <= M*G); block_table [B,M] int (entries past a row's last page are never
  read). Returns (out [B,T,N,C] in q.dtype, lse [B,T,N] float32). q is cast to the cache dtype
  for the matmuls; block_h heads (default all N) share one block of the grid.
  """
  reason = unsupported_reason(q.shape, c_pages.shape, r_pages.shape, block_table.shape)
  if reason is not None:
    raise ValueError(f"mla_decode kernel: {reason}")
  batch, n_queries, n_heads, _ = q.shape
  _, page_size, lat = c_pages.shape
  rope = r_pages.shape[-1]
  n_pages = block_table.shape[1]
  block_h = _check_block_h(n_heads, n_queries, block_h)
  rows = block_h * n_queries
  pps = pl.cdiv(n_pages, num_splits)

  # Rows x = n*T + t: a head block is a contiguous slice, query t is x % T.
  q_rows = jnp.swapaxes(q, 1, 2).reshape(batch, n_heads * n_queries, lat + rope)
  q_c, q_r = q_rows[..., :lat], q_rows[..., lat:]
  table = block_table.astype(jnp.int32).reshape(-1)  # 1-D: SMEM pads 2-D arrays
  lengths = lengths.astype(jnp.int32)

  def page_map(b, h, k, p, lengths_ref, table_ref):
    # Past the row's last valid page, repeat it: same block index, no DMA, no stale entry read.
    last = jax.lax.div(lengths_ref[b] - 1, page_size)  # lax.div: // lowers to sign() on Mosaic
    logical = jnp.minimum(k * pps + p, last)
    return table_ref[b * n_pages + logical], 0, 0

  q_map = lambda b, h, k, p, *_: (b, h, 0)
  out_map = lambda b, h, k, p, *_: (k, b, h, 0)
  out_dtype = q.dtype if num_splits == 1 else jnp.float32
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(batch, n_heads // block_h, num_splits, pps),
      in_specs=[pl.BlockSpec((None, rows, lat), q_map),
                pl.BlockSpec((None, rows, rope), q_map),
                pl.BlockSpec((None, page_size, lat), page_map),
                pl.BlockSpec((None, page_size, rope), page_map)],
      out_specs=[pl.BlockSpec((None, None, rows, lat), out_map),
                 pl.BlockSpec((None, None, rows, 1), out_map)],
      scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32),
                      pltpu.VMEM((rows, 1), jnp.float32),
                      pltpu.VMEM((rows, lat), jnp.float32)])
  kernel = functools.partial(_decode_kernel, scale=softmax_scale, causal=causal,
                             n_queries=n_queries, pages_per_split=pps)
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((num_splits, batch, n_heads * n_queries, lat), out_dtype),
                 jax.ShapeDtypeStruct((num_splits, batch, n_heads * n_queries, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="mla_decode_paged",
  )(lengths, table, q_c, q_r, c_pages, r_pages)

  lse = lse[..., 0]
  out, lse = combine_splits(out, lse)  # a no-op for one split
  out = out.reshape(batch, n_heads, n_queries, lat).swapaxes(1, 2).astype(q.dtype)
  lse = lse.reshape(batch, n_heads, n_queries).swapaxes(1, 2)
  return out, lse
