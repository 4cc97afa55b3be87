"""FlashAttention-2 for TPU (Pallas Mosaic): MLA's training/prefill attention, forward and backward.

Axis legend: B batch, N heads, T query length, S key length (= T: self-attention),
H = d_qk (192 for V2/V3: 128 nope + 64 rope), V = d_v (128). Kernel layout is [B,N,T,H]:
heads before tokens, so a block is a (tokens, features) tile in VMEM.

How it works
------------
    s = scale * q k^T  (masked: key j > query i when causal; different segment ids),
    p = softmax(s),   o = p v,   lse = log sum_j exp(s_ij).

Forward: grid (B, N, q blocks, kv blocks), kv innermost ("arbitrary"). Each step folds one
[bq, bkv] score tile into a running max m, denominator l and accumulator acc (f32 VMEM scratch):

    m' = max(m, rowmax(s)),  a = exp(m - m'),  l' = a l + rowsum(exp(s - m')),
    acc' = a acc + exp(s - m') v;       after the last kv block: o = acc / l,  lse = m + log l.

Masked scores are a large finite negative, never -inf, so exp never sees inf - inf. A row whose
keys in the first blocks are all masked accumulates junk with m = that negative; the first visible
key makes a = exp(negative - real) = 0 and wipes it. Every query sees itself, so each row gets one.

Backward (FlashAttention-2, p recomputed from the saved lse; delta = rowsum(dO * O)):

    p = exp(s - lse),  dp = dO v^T,  ds = p (dp - delta),
    dv = p^T dO,  dk = scale ds^T q,  dq = scale ds k.

The dK/dV kernel runs grid (B, N, kv blocks, q blocks) accumulating dk, dv over q blocks; it works
on transposed tiles s^T = k q^T [bkv, bq], so the per-query lse and delta broadcast along lanes as
rows and every matmul stays in the MXU's natural (lhs rows, rhs contracted) form. The dQ kernel
runs grid (B, N, q blocks, kv blocks) accumulating dq over kv blocks.

Causal skipping: a tile above the diagonal is neither computed (pl.when) nor fetched: its block
index is clamped to the last (or, for dK/dV, first) needed block, so the pipeline sees an unchanged
index and re-uses the buffer. Only tiles that straddle the diagonal build the causal mask.

TPU tiling: lse and delta travel lane-dense as [B, N, 1, T] (block [1, bq]); the forward turns
its [bq, 1] column into that row with one transpose per q block, and the dQ kernel turns it back
once per q block into scratch. Segment ids travel twice: as rows [B, 8, T] (sublane-broadcast)
and as columns [B, T, 128] (lane-broadcast), so either side slices out what it needs.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_LANES, _SUBLANES = 128, 8
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp(mask - mask) is not NaN
_DIMS = ("parallel", "parallel", "parallel", "arbitrary")


def unsupported_reason(q_shape, k_shape, v_shape, block_q: int = 128,
                       block_kv: int = 128) -> Optional[str]:
  """None if the Mosaic kernels handle these shapes, else why not (the caller falls back to XLA)."""
  if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
    return "q, k, v must be rank 4 [B,N,T,H]"
  (b, n, t, h), (kb, kn, s, kh), (vb, vn, vs, _) = q_shape, k_shape, v_shape
  if (kb, kn, kh) != (b, n, h) or (vb, vn, vs) != (b, n, s):
    return f"mismatched q {q_shape}, k {k_shape}, v {v_shape} (no GQA/MQA here)"
  if s != t:
    return f"self-attention only: key length {s} != query length {t}"
  for name, block in (("block_q", block_q), ("block_kv", block_kv)):
    block = min(block, t)
    if t % block:
      return f"T={t} is not a multiple of {name}={block}"
    if block != t and block % _LANES:
      return f"{name}={block} is neither T nor a multiple of {_LANES} (TPU lane tiling)"
  return None


def _row(x):
  """[R, 1] column -> [1, R] row, via a lane-dense (R, 128) tile (Mosaic transposes 2-D tiles)."""
  return jnp.broadcast_to(x, (x.shape[0], _LANES)).T[:1, :]


def _col(x):
  """[1, R] row -> [R, 1] column."""
  return jnp.broadcast_to(x, (_LANES, x.shape[1])).T[:, :1]


def _dot(a, b, contract_b: int = 0):
  """a @ b (contract_b=0) or a @ b^T (contract_b=1), accumulated in f32 on the MXU.

  Precision is pinned rather than read from jax_default_matmul_precision: Mosaic rejects fp32
  contract precision on bf16 operands (bf16 products are exact anyway); f32 operands get HIGHEST.
  """
  exact = a.dtype == jnp.float32 and b.dtype == jnp.float32
  precision = jax.lax.Precision.HIGHEST if exact else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def _visible(shape, q_axis: int, q_start, k_start, causal: bool, q_seg=None, k_seg=None):
  """Boolean tile of `shape` (queries along q_axis): key <= query (if causal) and same segment."""
  keep = None
  if causal:
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, q_axis)
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
    keep = k_pos <= q_pos
  if q_seg is not None:
    same = q_seg == k_seg
    keep = same if keep is None else keep & same
  return keep


def _causal_steps(i, j, bq: int, bkv: int):
  """(tile (q block i, kv block j) has a visible key, tile straddles the diagonal)."""
  needed = j * bkv <= (i + 1) * bq - 1  # first key <= last query
  straddles = (j + 1) * bkv - 1 > i * bq  # last key > first query
  return needed, needed & straddles


def _run_tile(i, j, bq, bkv, causal, step):
  """Calls step(apply_causal_mask) on tiles that need it, skipping tiles above the diagonal."""
  if not causal:
    step(False)
    return
  needed, straddles = _causal_steps(i, j, bq, bkv)
  pl.when(needed & jnp.logical_not(straddles))(lambda: step(False))
  pl.when(straddles)(lambda: step(True))


def _segment_layouts(segment_ids):
  """[B,T] -> (rows [B,8,T], columns [B,T,128]): lane- and sublane-dense copies for TPU tiles."""
  b, t = segment_ids.shape
  seg = segment_ids.astype(jnp.int32)
  return (jnp.broadcast_to(seg[:, None, :], (b, _SUBLANES, t)),
          jnp.broadcast_to(seg[:, :, None], (b, t, _LANES)))


def _seg_specs(bq: int, bkv: int, q_index, k_index, q_rows: bool):
  """BlockSpecs for (row layout, column layout) segment ids; q side is rows iff q_rows."""
  row_block, col_block = (bq, bkv) if q_rows else (bkv, bq)
  row_index, col_index = (q_index, k_index) if q_rows else (k_index, q_index)
  return [pl.BlockSpec((None, _SUBLANES, row_block), lambda *g: (g[0], 0, row_index(*g))),
          pl.BlockSpec((None, col_block, _LANES), lambda *g: (g[0], col_index(*g), 0))]


def _blocks(q, k, block_q: int, block_kv: int):
  """Block sizes clamped to T; raises where unsupported_reason would name a divisibility problem."""
  t = q.shape[2]
  if k.shape[2] != t:
    raise ValueError(f"self-attention only: key length {k.shape[2]} != query length {t}")
  bq, bkv = min(block_q, t), min(block_kv, t)
  if t % bq or t % bkv:
    raise ValueError(f"T={t} must be a multiple of the blocks ({bq}, {bkv}); "
                     "check unsupported_reason first")
  return bq, bkv


# Index maps run on the scalar core; lax.div (truncating) avoids floor_divide's sign fix-up,
# which does not lower there. Both numerators are >= 0.
def _last_kv(i, bq: int, bkv: int):
  return jax.lax.div((i + 1) * bq - 1, bkv)


def _first_q(j, bq: int, bkv: int):
  return jax.lax.div(j * bkv, bq)


# ------------------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, scale, causal, has_seg, bq, bkv):
  q_ref, k_ref, v_ref = refs[:3]
  seg_rows_ref, seg_cols_ref = refs[3:5] if has_seg else (None, None)
  out_ref, lse_ref, m_scr, l_scr, acc_scr = refs[5 if has_seg else 3:]
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def step(apply_causal: bool):
    s = _dot(q_ref[...], k_ref[...], 1) * scale  # [bq, bkv]
    q_seg = seg_cols_ref[:, :1] if has_seg else None  # [bq, 1]
    k_seg = seg_rows_ref[:1, :] if has_seg else None  # [1, bkv]
    keep = _visible(s.shape, 0, i * bq, j * bkv, apply_causal, q_seg, k_seg)
    if keep is not None:
      s = jnp.where(keep, s, _MASK_VALUE)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    pv = _dot(p.astype(v_ref.dtype), v_ref[...])
    acc_scr[...] = alpha * acc_scr[...] + pv
    m_scr[...] = m_new

  _run_tile(i, j, bq, bkv, causal, step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_scr[...]
    out_ref[...] = (acc_scr[...] / l).astype(out_ref.dtype)
    lse_ref[...] = _row(m_scr[...] + jnp.log(l))


@functools.partial(jax.jit, static_argnames=("softmax_scale", "causal", "block_q", "block_kv",
                                             "interpret"))
def flash_forward(q, k, v, segment_ids=None, *, softmax_scale: float, causal: bool = True,
                  block_q: int = 128, block_kv: int = 128, interpret: bool = False):
  """q [B,N,T,H], k [B,N,S,H], v [B,N,S,V], segment_ids [B,T] or None
  -> (out [B,N,T,V] in q.dtype, lse [B,N,T] float32 of the scaled scores)."""
  b, n, t, h = q.shape
  d_v = v.shape[-1]
  bq, bkv = _blocks(q, k, block_q, block_kv)
  kv_index = (lambda b_, n_, i, j: jnp.minimum(j, _last_kv(i, bq, bkv))) if causal else (
      lambda b_, n_, i, j: j)
  in_specs = [
      pl.BlockSpec((None, None, bq, h), lambda b_, n_, i, j: (b_, n_, i, 0)),
      pl.BlockSpec((None, None, bkv, h), lambda *g: (g[0], g[1], kv_index(*g), 0)),
      pl.BlockSpec((None, None, bkv, d_v), lambda *g: (g[0], g[1], kv_index(*g), 0)),
  ]
  args = [q, k, v]
  if segment_ids is not None:
    in_specs += _seg_specs(bq, bkv, lambda b_, n_, i, j: i, kv_index, q_rows=False)
    args += _segment_layouts(segment_ids)
  kernel = functools.partial(_fwd_kernel, scale=softmax_scale, causal=causal,
                             has_seg=segment_ids is not None, bq=bq, bkv=bkv)
  visible = 0.5 if causal else 1.0
  out, lse = pl.pallas_call(
      kernel,
      grid=(b, n, t // bq, t // bkv),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bq, d_v), lambda b_, n_, i, j: (b_, n_, i, 0)),
                 pl.BlockSpec((None, None, 1, bq), lambda b_, n_, i, j: (b_, n_, 0, i))],
      out_shape=[jax.ShapeDtypeStruct((b, n, t, d_v), q.dtype),
                 jax.ShapeDtypeStruct((b, n, 1, t), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d_v), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=_DIMS),
      cost_estimate=pl.CostEstimate(
          flops=int(2 * b * n * t * t * (h + d_v) * visible),
          transcendentals=int(b * n * t * t * visible),
          bytes_accessed=sum(x.size * x.dtype.itemsize for x in (q, k, v))
          + b * n * t * (d_v * q.dtype.itemsize + 4)),  # + out, lse
      interpret=interpret,
      name="mla_flash_forward",
  )(*args)
  return out, lse.reshape(b, n, t)


# ------------------------------------------------------------------------------------ backward


def _dkv_kernel(*refs, scale, causal, has_seg, bq, bkv):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  seg_rows_ref, seg_cols_ref = refs[6:8] if has_seg else (None, None)
  dk_ref, dv_ref, dk_scr, dv_scr = refs[8 if has_seg else 6:]
  j, i = pl.program_id(2), pl.program_id(3)  # kv block, q block (innermost)

  @pl.when(i == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def step(apply_causal: bool):
    # Transposed tiles [bkv, bq]: per-query lse and delta are [1, bq] rows.
    q, d_out = q_ref[...], do_ref[...]
    s_t = _dot(k_ref[...], q, 1) * scale
    q_seg = seg_rows_ref[:1, :] if has_seg else None  # [1, bq]
    k_seg = seg_cols_ref[:, :1] if has_seg else None  # [bkv, 1]
    keep = _visible(s_t.shape, 1, i * bq, j * bkv, apply_causal, q_seg, k_seg)
    p_t = _probabilities(s_t, keep, lse_ref[...])
    dv_scr[...] += _dot(p_t.astype(d_out.dtype), d_out)
    dp_t = _dot(v_ref[...], d_out, 1)
    ds_t = p_t * (dp_t - delta_ref[...])
    dk_scr[...] += _dot(ds_t.astype(q.dtype), q)

  _run_tile(i, j, bq, bkv, causal, step)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _probabilities(scores, keep, lse):
  """P = exp(s - lse) recomputed in the backward pass, masked scores included."""
  if keep is not None:
    scores = jnp.where(keep, scores, _MASK_VALUE)
  return jnp.exp(scores - lse)


def _dq_kernel(*refs, scale, causal, has_seg, bq, bkv):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  seg_rows_ref, seg_cols_ref = refs[6:8] if has_seg else (None, None)
  dq_ref, dq_scr, lse_scr, delta_scr = refs[8 if has_seg else 6:]
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
    lse_scr[...] = _col(lse_ref[...])  # once per q block: [1, bq] row -> [bq, 1] column
    delta_scr[...] = _col(delta_ref[...])

  def step(apply_causal: bool):
    k = k_ref[...]
    s = _dot(q_ref[...], k, 1) * scale  # [bq, bkv]
    q_seg = seg_cols_ref[:, :1] if has_seg else None
    k_seg = seg_rows_ref[:1, :] if has_seg else None
    keep = _visible(s.shape, 0, i * bq, j * bkv, apply_causal, q_seg, k_seg)
    p = _probabilities(s, keep, lse_scr[...])
    dp = _dot(do_ref[...], v_ref[...], 1)
    ds = p * (dp - delta_scr[...])
    dq_scr[...] += _dot(ds.astype(k.dtype), k)

  _run_tile(i, j, bq, bkv, causal, step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _bwd_call(kernel, args, seg_layouts, *, grid, q_index, kv_index, shapes, kv_outer, bq, bkv,
              out_specs, out_shape, scratch_shapes, interpret, name):
  """One backward pallas_call over (q, k, v, dO, lse, delta[, segment rows, columns])."""
  (h, d_v), q_map = shapes, lambda *g: (g[0], g[1], q_index(*g), 0)
  kv_map = lambda *g: (g[0], g[1], kv_index(*g), 0)
  in_specs = [pl.BlockSpec((None, None, bq, h), q_map),
              pl.BlockSpec((None, None, bkv, h), kv_map),
              pl.BlockSpec((None, None, bkv, d_v), kv_map),
              pl.BlockSpec((None, None, bq, d_v), q_map)]
  in_specs += [pl.BlockSpec((None, None, 1, bq), lambda *g: (g[0], g[1], 0, q_index(*g)))] * 2
  if seg_layouts is not None:
    in_specs += _seg_specs(bq, bkv, q_index, kv_index, q_rows=kv_outer)
    args = args + list(seg_layouts)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=scratch_shapes,
      compiler_params=pltpu.CompilerParams(dimension_semantics=_DIMS),
      interpret=interpret, name=name)(*args)


@functools.partial(jax.jit, static_argnames=("softmax_scale", "causal", "block_q", "block_kv",
                                             "interpret"))
def flash_backward(q, k, v, segment_ids, out, lse, d_out, *, softmax_scale: float,
                   causal: bool = True, block_q: int = 128, block_kv: int = 128,
                   interpret: bool = False, d_lse=None):
  """Cotangents (dq, dk, dv), in the dtypes of q, k, v, of flash_forward's out (and lse).

  out [B,N,T,V] and lse [B,N,T] are flash_forward's results; d_out [B,N,T,V] is out's cotangent,
  d_lse [B,N,T] (optional) lse's: d lse / d s = p, so it folds into delta as delta - d_lse.
  """
  b, n, t, h = q.shape
  d_v = v.shape[-1]
  bq, bkv = _blocks(q, k, block_q, block_kv)
  delta = jnp.einsum("BNTV,BNTV->BNT", d_out.astype(jnp.float32), out.astype(jnp.float32))
  if d_lse is not None:
    delta = delta - d_lse.astype(jnp.float32)
  rows = lambda x: x.astype(jnp.float32).reshape(b, n, 1, t)
  args = [q, k, v, d_out, rows(lse), rows(delta)]
  seg = _segment_layouts(segment_ids) if segment_ids is not None else None
  common = dict(shapes=(h, d_v), bq=bq, bkv=bkv, interpret=interpret)
  static = dict(scale=softmax_scale, causal=causal, has_seg=seg is not None, bq=bq, bkv=bkv)
  nq, nk = t // bq, t // bkv

  # dK, dV: grid (B, N, kv block j, q block i); q blocks before the diagonal clamp forward.
  q_index = (lambda b_, n_, j, i: jnp.maximum(i, _first_q(j, bq, bkv))) if causal else (
      lambda b_, n_, j, i: i)
  kv_map = lambda b_, n_, j, i: (b_, n_, j, 0)
  dk, dv = _bwd_call(
      functools.partial(_dkv_kernel, **static), args, seg, grid=(b, n, nk, nq),
      q_index=q_index, kv_index=lambda b_, n_, j, i: j, kv_outer=True,
      out_specs=[pl.BlockSpec((None, None, bkv, h), kv_map),
                 pl.BlockSpec((None, None, bkv, d_v), kv_map)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((bkv, h), jnp.float32), pltpu.VMEM((bkv, d_v), jnp.float32)],
      name="mla_flash_backward_dkv", **common)

  # dQ: grid (B, N, q block i, kv block j); kv blocks past the diagonal clamp back.
  kv_index = (lambda b_, n_, i, j: jnp.minimum(j, _last_kv(i, bq, bkv))) if causal else (
      lambda b_, n_, i, j: j)
  dq = _bwd_call(
      functools.partial(_dq_kernel, **static), args, seg, grid=(b, n, nq, nk),
      q_index=lambda b_, n_, i, j: i, kv_index=kv_index, kv_outer=False,
      out_specs=pl.BlockSpec((None, None, bq, h), lambda b_, n_, i, j: (b_, n_, i, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, 1), jnp.float32)],
      name="mla_flash_backward_dq", **common)
  return dq, dk, dv
