"""FlashAttention-2 forward and backward for MLA training/prefill: Pallas kernels, Triton lowering.

Axis legend: B batch, N heads, T query length, S key length (= T), H = d_qk (192 for MLA: 128
nope + 64 rope), V = d_v (128). The kernel layout is [B, N, T, H], heads before tokens, so each
(b, n) pair owns a contiguous [T, H] matrix; the model's [B, T, N, H] is transposed by the caller.

    s = scale q k^T, masked where key j > query i (causal, by token index) or where the segment
    ids differ (packed documents);   p = softmax(s),   o = p v,   lse = log sum_j exp(s_j).

How this works.
Forward: one program per (b, n, q block) keeps its q tile on chip and walks the kv blocks with an
online softmax: a running row max m, running sum l and an unnormalised accumulator, rescaled by
exp(m_old - m_new) whenever the max grows. When causal the walk stops at the block holding the
diagonal (later blocks are all masked), which halves the work. It stores o = acc / l and lse.

Backward (FlashAttention-2, Dao 2023 Alg. 2): with delta_i = sum_v dO_iv O_iv (f32, plain XLA),
    p = exp(s - lse),  dv = p^T dO,  dp = dO v^T,  ds = p (dp - delta),  dq = scale ds k,
    dk = scale ds^T q.
Two kernels, so no program writes another's output and no atomics are needed: one program per kv
block sums dk and dv over the q blocks from the diagonal down; one program per q block sums dq
over the kv blocks up to the diagonal. Both recompute p from lse instead of storing [T, S].

Power-of-two tiles: Triton tensors must have power-of-two shapes and H = 192 is not one. The refs
keep the whole head dim (a ref is only a pointer and strides); the kernels load it in power-of-two
column chunks (128 + 64) with pl.ds and sum the partial products, q k^T = q_a k_a^T + q_b k_b^T.
Nothing is padded and the wrapper copies nothing. V is chunked the same way if it needs to be.

Numerics: scores, softmax statistics and accumulators are float32; p and ds are cast to the input
dtype for the tensor-core dots (usual FlashAttention practice). Exponentials are base 2 with
log2(e) folded into the scale; lse is returned in natural log. Masked scores are a large finite
negative MASK rather than -inf: a row whose current kv block is wholly masked (another document)
then gets finite junk instead of NaN, and the junk is wiped by the rescale exp2(MASK - m) = 0 as
soon as a visible key arrives; every row sees at least itself, so one always does.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
MASK = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, and MASK - (any score) stays finite
MIN_DIM = 16  # Triton's tensor-core dots need every matrix dimension >= 16


def _chunks(dim: int) -> tuple[tuple[int, int], ...]:
  """Power-of-two column chunks (start, size) tiling [0, dim), largest first: 192 -> 128 + 64."""
  chunks, start = [], 0
  for bit in reversed(range(dim.bit_length())):
    if dim & (1 << bit):
      chunks.append((start, 1 << bit))
      start += 1 << bit
  return tuple(chunks)


def _block_sizes(t: int, block_q: int, block_kv: int) -> tuple[int, int]:
  return min(block_q, t), min(block_kv, t)


def unsupported_reason(q_shape, k_shape, v_shape, block_q: int = 64,
                       block_kv: int = 64) -> Optional[str]:
  """None if the kernels handle these [B, N, T, H] shapes, else why not (the caller uses XLA)."""
  if not len(q_shape) == len(k_shape) == len(v_shape) == 4:
    return "q, k, v must be rank 4 [B, N, T, H]"
  b, n, t, h = q_shape
  if tuple(k_shape[:3]) != (b, n, t) or tuple(v_shape[:3]) != (b, n, t):
    return f"self-attention only: q {q_shape}, k {k_shape}, v {v_shape} must share B, N, T"
  if k_shape[3] != h:
    return f"q and k head dims differ ({h} vs {k_shape[3]})"
  bq, bkv = _block_sizes(t, block_q, block_kv)
  for name, blk in (("block_q", bq), ("block_kv", bkv)):
    if blk < MIN_DIM or blk & (blk - 1):
      return f"{name}={blk} must be a power of two >= {MIN_DIM} (Triton tiles)"
    if t % blk:
      return f"T={t} is not a multiple of {name}={blk}"
  for name, dim in (("H", h), ("V", v_shape[3])):
    if dim % MIN_DIM:
      return f"{name}={dim} is not a multiple of {MIN_DIM} (power-of-two chunks >= {MIN_DIM})"
  return None


# ----------------------------------------------------------------------------- kernel pieces
def _dot(a, b, contract_a: int, contract_b: int):
  """Tensor-core dot with a float32 accumulator, contracting one axis of each 2-D operand."""
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _dot_chunks(a_parts, b_parts):
  """a b^T [rows_a, rows_b] for operands split into matching column chunks: sum of chunk dots."""
  return functools.reduce(operator.add, [_dot(a, b, 1, 1) for a, b in zip(a_parts, b_parts)])


def _load(ref, rows, chunks):
  """The rows of a 2-D ref, as one power-of-two wide tile per column chunk."""
  return [ref[rows, pl.ds(start, size)] for start, size in chunks]


def _scores(q_parts, k_parts, rows, cols, seg_q, seg_k, *, scale2: float, causal: bool):
  """Masked base-2 scores [bq, bkv] = scale log2(e) q k^T, summed over the head-dim chunks."""
  s = _dot_chunks(q_parts, k_parts) * scale2
  visible = None
  if causal:
    visible = cols[None, :] <= rows[:, None]
  if seg_q is not None:
    same_doc = seg_q[:, None] == seg_k[None, :]
    visible = same_doc if visible is None else visible & same_doc
  return s if visible is None else jnp.where(visible, s, MASK)


def _unpack(refs, has_seg: bool):
  """Segment ids come first when given; the kernels see None otherwise."""
  return (refs[0], refs[1:]) if has_seg else (None, refs)


def _fwd_kernel(*refs, scale2, causal, has_seg, block_q, block_kv, h_chunks, v_chunks):
  seg_ref, (q_ref, k_ref, v_ref, o_ref, lse_ref) = _unpack(refs, has_seg)
  i = pl.program_id(2)
  rows = i * block_q + jnp.arange(block_q)
  q = _load(q_ref, slice(None), h_chunks)  # stays on chip for the whole kv walk
  seg_q = seg_ref[pl.ds(i * block_q, block_q)] if has_seg else None

  def body(j, carry):
    acc, m, l = carry
    kv = pl.ds(j * block_kv, block_kv)
    s = _scores(q, _load(k_ref, kv, h_chunks), rows, j * block_kv + jnp.arange(block_kv),
                seg_q, seg_ref[kv] if has_seg else None, scale2=scale2, causal=causal)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    rescale = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = rescale * l + jnp.sum(p, axis=1)
    p = p.astype(v_ref.dtype)
    acc = tuple(rescale[:, None] * a + _dot(p, vc, 1, 0)
                for a, vc in zip(acc, _load(v_ref, kv, v_chunks)))
    return acc, m_new, l

  num_kv = k_ref.shape[0] // block_kv
  if causal:  # through the block holding the diagonal: ceil((i + 1) block_q / block_kv)
    num_kv = lax.div((i + 1) * block_q + block_kv - 1, block_kv)
  init = (tuple(jnp.zeros((block_q, size), jnp.float32) for _, size in v_chunks),
          jnp.full((block_q,), MASK, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(0, num_kv, body, init)
  inv_l = 1.0 / l
  for (start, size), a in zip(v_chunks, acc):
    o_ref[:, pl.ds(start, size)] = (a * inv_l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = (m + jnp.log2(l)) * (1.0 / LOG2E)


def _dkdv_kernel(*refs, scale, causal, has_seg, block_q, block_kv, h_chunks, v_chunks):
  seg_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref) = _unpack(
      refs, has_seg)
  j = pl.program_id(2)
  cols = j * block_kv + jnp.arange(block_kv)
  k = _load(k_ref, slice(None), h_chunks)
  v = _load(v_ref, slice(None), v_chunks)
  seg_k = seg_ref[pl.ds(j * block_kv, block_kv)] if has_seg else None

  def body(i, carry):
    dk, dv = carry
    qs = pl.ds(i * block_q, block_q)
    q, do = _load(q_ref, qs, h_chunks), _load(do_ref, qs, v_chunks)
    s = _scores(q, k, i * block_q + jnp.arange(block_q), cols, seg_ref[qs] if has_seg else None,
                seg_k, scale2=scale * LOG2E, causal=causal)
    p = jnp.exp2(s - (lse_ref[qs] * LOG2E)[:, None])  # = exp(scale q k^T - lse), 0 where masked
    dp = _dot_chunks(do, v)
    ds = (p * (dp - delta_ref[qs][:, None])).astype(q_ref.dtype)
    p = p.astype(do_ref.dtype)
    dv = tuple(acc + _dot(p, d, 0, 0) for acc, d in zip(dv, do))  # p^T dO
    dk = tuple(acc + _dot(ds, qc, 0, 0) for acc, qc in zip(dk, q))  # ds^T q
    return dk, dv

  # Queries above the diagonal see none of these keys: start at the q block holding key j*bkv.
  first = lax.div(j * block_kv, block_q) if causal else 0
  init = (tuple(jnp.zeros((block_kv, size), jnp.float32) for _, size in h_chunks),
          tuple(jnp.zeros((block_kv, size), jnp.float32) for _, size in v_chunks))
  dk, dv = lax.fori_loop(first, q_ref.shape[0] // block_q, body, init)
  for (start, size), acc in zip(h_chunks, dk):
    dk_ref[:, pl.ds(start, size)] = (acc * scale).astype(dk_ref.dtype)
  for (start, size), acc in zip(v_chunks, dv):
    dv_ref[:, pl.ds(start, size)] = acc.astype(dv_ref.dtype)


def _dq_kernel(*refs, scale, causal, has_seg, block_q, block_kv, h_chunks, v_chunks):
  seg_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref) = _unpack(refs, has_seg)
  i = pl.program_id(2)
  rows = i * block_q + jnp.arange(block_q)
  q = _load(q_ref, slice(None), h_chunks)
  do = _load(do_ref, slice(None), v_chunks)
  seg_q = seg_ref[pl.ds(i * block_q, block_q)] if has_seg else None
  lse2 = (lse_ref[...] * LOG2E)[:, None]
  delta = delta_ref[...][:, None]

  def body(j, dq):
    kv = pl.ds(j * block_kv, block_kv)
    k = _load(k_ref, kv, h_chunks)
    s = _scores(q, k, rows, j * block_kv + jnp.arange(block_kv), seg_q,
                seg_ref[kv] if has_seg else None, scale2=scale * LOG2E, causal=causal)
    p = jnp.exp2(s - lse2)
    dp = _dot_chunks(do, _load(v_ref, kv, v_chunks))
    ds = (p * (dp - delta)).astype(k_ref.dtype)
    return tuple(acc + _dot(ds, kc, 1, 0) for acc, kc in zip(dq, k))  # ds k

  num_kv = k_ref.shape[0] // block_kv
  if causal:
    num_kv = lax.div((i + 1) * block_q + block_kv - 1, block_kv)
  init = tuple(jnp.zeros((block_q, size), jnp.float32) for _, size in h_chunks)
  dq = lax.fori_loop(0, num_kv, body, init)
  for (start, size), acc in zip(h_chunks, dq):
    dq_ref[:, pl.ds(start, size)] = (acc * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- wrappers
class _Specs:
  """BlockSpecs over the grid (b, n, tile): one tile of T rows, or all T rows of (b, n)."""

  def __init__(self, t: int, block: int):
    self.t, self.block = t, block

  def tile(self, width: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, self.block, width), lambda b, n, x: (b, n, x, 0))

  def full(self, width: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, self.t, width), lambda b, n, x: (b, n, 0, 0))

  def tile_rows(self) -> pl.BlockSpec:  # lse, delta [B, N, T]
    return pl.BlockSpec((None, None, self.block), lambda b, n, x: (b, n, x))

  def full_rows(self) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, self.t), lambda b, n, x: (b, n, 0))

  def segments(self) -> pl.BlockSpec:  # segment ids [B, T], sliced inside the kernel
    return pl.BlockSpec((None, self.t), lambda b, n, x: (b, 0))


def _check(q, k, v, block_q, block_kv):
  reason = unsupported_reason(q.shape, k.shape, v.shape, block_q, block_kv)
  if reason is not None:
    raise ValueError(f"flash attention kernel: {reason}")
  return _block_sizes(q.shape[2], block_q, block_kv)


def _call(kernel, segment_ids, args, in_specs, specs: _Specs, out_specs, out_shape, *, grid,
          num_warps, num_stages, interpret, name, **kernel_params):
  """pallas_call with the segment ids prepended when given."""
  has_seg = segment_ids is not None
  if has_seg:
    args = [segment_ids.astype(jnp.int32), *args]
    in_specs = [specs.segments(), *in_specs]
  return pl.pallas_call(
      functools.partial(kernel, has_seg=has_seg, **kernel_params), out_shape=out_shape,
      grid=grid, in_specs=in_specs, out_specs=out_specs, interpret=interpret, name=name,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
  )(*args)


_STATIC = ("softmax_scale", "causal", "block_q", "block_kv", "num_warps", "num_stages",
           "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def flash_forward(q, k, v, segment_ids, *, softmax_scale: float, causal: bool = True,
                  block_q: int = 64, block_kv: int = 64, num_warps: int = 4, num_stages: int = 2,
                  interpret: bool = False):
  """q [B,N,T,H], k [B,N,S,H], v [B,N,S,V], segment_ids [B,T] | None -> (o [B,N,T,V], lse [B,N,T]).

  o has q's dtype; lse (float32) is the natural log-sum-exp of the scaled, masked scores.
  """
  bq, bkv = _check(q, k, v, block_q, block_kv)
  b, n, t, h = q.shape
  d_v = v.shape[3]
  specs = _Specs(t, bq)
  return _call(
      _fwd_kernel, segment_ids, [q, k, v], [specs.tile(h), specs.full(h), specs.full(d_v)],
      specs, [specs.tile(d_v), specs.tile_rows()],
      [jax.ShapeDtypeStruct((b, n, t, d_v), q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
      grid=(b, n, t // bq), num_warps=num_warps, num_stages=num_stages, interpret=interpret,
      name="mla_flash_forward", scale2=softmax_scale * LOG2E, causal=causal, block_q=bq,
      block_kv=bkv, h_chunks=_chunks(h), v_chunks=_chunks(d_v))


@functools.partial(jax.jit, static_argnames=_STATIC)
def flash_backward(q, k, v, segment_ids, out, lse, d_out, *, softmax_scale: float,
                   causal: bool = True, block_q: int = 64, block_kv: int = 64, num_warps: int = 4,
                   num_stages: int = 2, interpret: bool = False):
  """Cotangents (dq, dk, dv) of flash_forward's o, given its (out, lse) and d_out [B,N,T,V]."""
  bq, bkv = _check(q, k, v, block_q, block_kv)
  b, n, t, h = q.shape
  d_v = v.shape[3]
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)  # [B,N,T] f32
  lse = lse.astype(jnp.float32)
  common = dict(num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                scale=softmax_scale, causal=causal, block_q=bq, block_kv=bkv,
                h_chunks=_chunks(h), v_chunks=_chunks(d_v))
  args = [q, k, v, d_out, lse, delta]

  by_kv = _Specs(t, bkv)  # program per kv block; q, dO, lse, delta whole
  dk, dv = _call(
      _dkdv_kernel, segment_ids, args,
      [by_kv.full(h), by_kv.tile(h), by_kv.tile(d_v), by_kv.full(d_v), by_kv.full_rows(),
       by_kv.full_rows()],
      by_kv, [by_kv.tile(h), by_kv.tile(d_v)],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(b, n, t // bkv), name="mla_flash_backward_dkdv", **common)

  by_q = _Specs(t, bq)  # program per q block; k, v whole
  dq = _call(
      _dq_kernel, segment_ids, args,
      [by_q.tile(h), by_q.full(h), by_q.full(d_v), by_q.tile(d_v), by_q.tile_rows(),
       by_q.tile_rows()],
      by_q, by_q.tile(h), jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(b, n, t // bq), name="mla_flash_backward_dq", **common)
  return dq, dk, dv
