"""MLA decode over a paged latent cache: a Pallas GPU kernel (Triton lowering).

Axis legend: B batch, T query tokens per row (s_q), N query heads, C = d_c (latent width),
R = d_R (rotary key width), P pages in the pool, G page size, M pages per row (block table
width), K kv splits, Q query rows of one program (block_h); a row's query rows are its T*N
(token, head) pairs, token-major.

How this works (FlashMLA's "MQA mode"). With W_UK absorbed into the query every head reads one
shared key [c_KV; k_R] (C + R wide) whose value is c_KV itself:

    s[q,j] = scale * (q_C[q] . c_KV[j] + q_R[q] . k_R[j]),   o[q] = sum_j softmax_j(s) c_KV[j]

Decode is memory bound, so the kernel is built to read each cached latent byte once per head
block. One program owns (batch row b, block of Q query rows h, split k). All T*N query rows of a
row share the cache, so they are stacked into the M dimension of the matmuls (Q rows, 16..64)
instead of one program per head. The program walks its split's pages: it reads the page id from
the block table, loads the page's [G, C] latent block and [G, R] rope block once, and uses the
latent block twice, as the first C key dims of Q.K^T and as V in P.V. Softmax is an f32 online
softmax (running max m, running sum l, rescaled accumulator [Q, C]) in base 2.

Only the row's last valid page can hold slots a query must not see: slots at or past the
length (garbage, possibly NaN) and, with causal T = 2, the newest slot for the first token. The
pages before it run an unmasked loop; the last page runs a second, masked loop of 0 or 1 steps,
which zeroes the invalid slots of the latent and rope blocks (0 * NaN would leak NaN through
P.V) and sets their scores to -inf. Block-table entries past the row's last valid page are never
read. Split-KV: split k takes the k-th of K equal chunks of the row's valid pages and writes its
normalised f32 output and lse (output 0, lse -inf when the chunk is empty); `combine_splits`
merges them.

Triton wants power-of-two block shapes: Q, C, R and G must be powers of two (512, 64, 64 in
DeepSeek-V2/V3); T*N is padded up to a multiple of Q. The Triton lowering is deprecated from
jax 0.11 (it warns); Mosaic GPU is the long-term Hopper path (kernel_mgpu.py).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.mla_decode.reference import paged_shape_error
from pallas_kernels.mla_decode.split_kv import combine_splits

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def _is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
  return 1 << max(0, x - 1).bit_length()


def unsupported_reason(q_shape, c_pages_shape, r_pages_shape,
                       block_table_shape) -> Optional[str]:
  """None when `mla_decode` handles these shapes, else why not (the caller falls back to XLA)."""
  error = paged_shape_error(q_shape, c_pages_shape, r_pages_shape, block_table_shape)
  if error is not None:
    return error
  (_, page, width), (_, _, rope) = c_pages_shape, r_pages_shape
  for name, dim in (("C", width), ("R", rope), ("G", page)):
    if not _is_pow2(dim) or dim < 16:
      return f"Triton needs a power-of-two {name} >= 16, got {dim}"
  if q_shape[1] > page:
    return f"T={q_shape[1]} new tokens exceed a page (G={page})"
  return None


def default_num_splits(batch: int, n_head_blocks: int, n_pages: int, n_sm: int = 132) -> int:
  """Splits per row so that batch * n_head_blocks * splits programs fill the SMs (1 when the
  batch alone does: every split costs a combine), at most one split per page."""
  programs = batch * n_head_blocks
  return max(1, min(n_pages, pl.cdiv(n_sm, programs)))


def _default_block_h(rows: int) -> int:
  # A [Q, 512] f32 accumulator is 64 registers per thread at Q = 16 with 4 warps; Q = 32 with 8
  # warps keeps that while halving how often the cache is re-read per row.
  return 16 if rows <= 16 else 32


def _online_softmax_step(carry, q_c, q_r, c, r, scale2, mask=None):
  """One page of the online softmax; scores in base 2 (scale2 = scale * log2 e)."""
  acc, m, l = carry
  contract_last = (((1,), (1,)), ((), ()))
  s = (lax.dot_general(q_c, c, contract_last, preferred_element_type=jnp.float32)
       + lax.dot_general(q_r, r, contract_last, preferred_element_type=jnp.float32)) * scale2
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  # A row that has seen only masked slots keeps m = -inf: shift by 0 so exp gives 0, not NaN.
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp2(s - shift[:, None])  # [Q, G]
  alpha = jnp.exp2(m - shift)
  l = alpha * l + jnp.sum(p, axis=1)
  pv = lax.dot(p.astype(c.dtype), c, preferred_element_type=jnp.float32)  # [Q, C]
  return acc * alpha[:, None] + pv, m_new, l


def _mla_decode_kernel(lengths_ref, block_table_ref, q_c_ref, q_r_ref, c_ref, r_ref, o_ref,
                       lse_ref, *, scale: float, n_tokens: int, n_heads: int, n_splits: int,
                       causal: bool):
  """Program (h, k, b): query rows [h*Q, (h+1)*Q) of row b over split k of its pages."""
  h, k, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  n_rows, width = q_c_ref.shape
  page = c_ref.shape[1]
  length = lengths_ref[b]
  n_valid = (length + page - 1) // page
  per_split = (n_valid + n_splits - 1) // n_splits
  start = k * per_split
  end = jnp.minimum(start + per_split, n_valid)
  q_c, q_r = q_c_ref[...], q_r_ref[...]
  scale2 = scale * _LOG2E

  def load_page(j):
    slot = block_table_ref[b, j]
    return c_ref[slot, :, :], r_ref[slot, :, :]

  def full_page(j, carry):
    c, r = load_page(j)
    return _online_softmax_step(carry, q_c, q_r, c, r, scale2)

  # Query row q is token t = q // N; with causal it sees slots < length - T + 1 + t.
  row = h * n_rows + lax.broadcasted_iota(jnp.int32, (n_rows, 1), 0)
  token = jnp.minimum(row // n_heads, n_tokens - 1)  # padded rows: any finite limit
  limit = length - n_tokens + 1 + token if causal else jnp.full_like(token, length)

  def last_page(j, carry):
    c, r = load_page(j)
    slot = j * page + lax.broadcasted_iota(jnp.int32, (page, 1), 0)  # [G, 1]
    c = jnp.where(slot < length, c, jnp.zeros_like(c))
    r = jnp.where(slot < length, r, jnp.zeros_like(r))
    mask = slot.reshape(1, page) < limit  # [Q, G]
    return _online_softmax_step(carry, q_c, q_r, c, r, scale2, mask)

  carry = (jnp.zeros((n_rows, width), jnp.float32),
           jnp.full((n_rows,), -jnp.inf, jnp.float32), jnp.zeros((n_rows,), jnp.float32))
  carry = lax.fori_loop(start, jnp.minimum(end, n_valid - 1), full_page, carry)
  acc, m, l = lax.fori_loop(jnp.maximum(start, n_valid - 1), end, last_page, carry)
  seen = l > 0.0
  safe_l = jnp.where(seen, l, 1.0)
  o_ref[...] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0)
  lse_ref[...] = jnp.where(seen, (m + jnp.log2(safe_l)) * _LN2, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("softmax_scale", "causal", "num_splits", "block_h",
                                             "num_warps", "num_stages", "interpret"))
def mla_decode(q: jax.Array, c_pages: jax.Array, r_pages: jax.Array, lengths: jax.Array,
               block_table: jax.Array, *, softmax_scale: float, causal: bool = True,
               num_splits: Optional[int] = None, block_h: Optional[int] = None,
               num_warps: Optional[int] = None, num_stages: int = 2,
               interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Paged MLA decode; semantics of `reference.mla_decode_reference` with a block table.

  q [B,T,N,C+R], c_pages [P,G,C], r_pages [P,G,R], lengths [B] int32 (valid slots, the T new
  tokens included, 1 <= lengths <= M*G), block_table [B,M] int32. Returns (out [B,T,N,C] in
  q.dtype, lse [B,T,N] float32). block_h: query rows (of the T*N per batch row) per program.
  """
  reason = unsupported_reason(q.shape, c_pages.shape, r_pages.shape, block_table.shape)
  if reason is not None:
    raise ValueError(f"mla_decode (Pallas GPU): {reason}")
  batch, n_tokens, n_heads, _ = q.shape
  width, rope = c_pages.shape[-1], r_pages.shape[-1]
  rows = n_tokens * n_heads
  block_h = block_h or _default_block_h(rows)
  if not _is_pow2(block_h) or block_h < 16:
    raise ValueError(f"block_h must be a power of two >= 16, got {block_h}")
  n_blocks = pl.cdiv(rows, block_h)
  n_splits = num_splits or default_num_splits(batch, n_blocks, block_table.shape[1])
  num_warps = num_warps or (4 if block_h <= 16 else 8)

  q = q.reshape(batch, rows, width + rope)  # token-major rows: free
  if rows % block_h:
    q = jnp.pad(q, ((0, 0), (0, n_blocks * block_h - rows), (0, 0)))
  # q's rope part is q[..., C:]: as block index C // R of R-wide blocks when R divides C, so q
  # is read in place; else slice it out.
  if width % rope == 0:
    q_c = q_r = q
    rope_block = width // rope
  else:
    q_c, q_r, rope_block = q[..., :width], q[..., width:], 0

  kernel = functools.partial(_mla_decode_kernel, scale=softmax_scale, n_tokens=n_tokens,
                             n_heads=n_heads, n_splits=n_splits, causal=causal)
  # The head block is the fastest grid axis: the programs that run together read the same pages,
  # so all but the first of them hit L2.
  whole = lambda shape: pl.BlockSpec(shape, lambda h, k, b: (0,) * len(shape))
  out, lse = pl.pallas_call(
      kernel,
      grid=(n_blocks, n_splits, batch),
      in_specs=[
          whole(lengths.shape),
          whole(block_table.shape),
          pl.BlockSpec((None, block_h, width), lambda h, k, b: (b, h, 0)),
          pl.BlockSpec((None, block_h, rope), lambda h, k, b: (b, h, rope_block)),
          whole(c_pages.shape),
          whole(r_pages.shape),
      ],
      out_specs=[
          pl.BlockSpec((None, None, block_h, width), lambda h, k, b: (k, b, h, 0)),
          pl.BlockSpec((None, None, block_h), lambda h, k, b: (k, b, h)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((n_splits, batch, n_blocks * block_h, width), jnp.float32),
          jax.ShapeDtypeStruct((n_splits, batch, n_blocks * block_h), jnp.float32),
      ],
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="mla_decode_paged",
  )(lengths.astype(jnp.int32), block_table.astype(jnp.int32), q_c, q_r, c_pages, r_pages)
  out, lse = combine_splits(out, lse)  # a no-op for one split
  out = out[:, :rows].reshape(batch, n_tokens, n_heads, width).astype(q.dtype)
  return out, lse[:, :rows].reshape(batch, n_tokens, n_heads)
