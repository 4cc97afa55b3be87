"""MLA decode over a paged latent cache: a Pallas Mosaic GPU kernel for Hopper (wgmma + TMA).

Axis legend: B batch, T query tokens per row (s_q), N query heads, C = d_c (latent width),
R = d_R (rotary key width), P pages in the pool, G page size, M pages per row (block table
width), K kv splits, Q = 64 query rows of one CTA (a row's T*N (token, head) pairs, token-major),
H = C / 2 the latent columns one compute warpgroup owns.

How this works (FlashMLA's "MQA mode"). With W_UK absorbed into the query every head reads one
shared key [c_KV; k_R] (C + R wide) whose value is c_KV itself:

    s[q,j] = scale * (q_C[q] . c_KV[j] + q_R[q] . k_R[j]),   o[q] = sum_j softmax_j(s) c_KV[j]

One CTA owns (block of Q query rows h, split k, batch row b) and runs three warpgroups (the
[Q, C] f32 accumulator is too big for one warpgroup's registers, so two share it by columns):

  * the producer (warpgroup 2) reads page ids from the block table in GMEM and TMA-copies each
    page's [G, C] latent block (as two [G, H] halves) and [G, R] rope block into a ring of
    `_SLOTS` SMEM buffers, refilling a slot once both consumers have released it;
  * warpgroup 0 computes S [Q, G] = Q_C K_C^T + Q_R K_R^T with wgmma (Q and the page in SMEM),
    runs the f32 online softmax in registers (base 2), hands P (in the operand dtype) and the
    rescale factors alpha to warpgroup 1 through SMEM, and accumulates O_0 = alpha O_0 + P V_0;
  * warpgroup 1 only accumulates O_1 = alpha O_1 + P V_1.
V_w is latent half w of the page already in SMEM: each latent byte is read from HBM once per
CTA and used twice, as key and as value. Warpgroup 0 writes the next P only after warpgroup 1
signalled it is done with the last one; at the end it hands over the row sums l the same way.

Only the row's last valid page can hold slots a query must not see: slots at or past the length
(garbage, possibly NaN) and, with causal T = 2, the newest slot for the first token. Full pages
run an unmasked loop; the last page runs a masked loop of 0 or 1 steps in which each compute
warpgroup first zeroes the invalid slots of its latent half in SMEM (0 * NaN would leak NaN
through P V), the two meet at a barrier, and the scores of invisible slots are set to -inf.
Block-table entries past the row's last valid page are never read. Split-KV: split k takes the
k-th of K equal chunks of the row's valid pages and writes its normalised f32 output and lse
(0 / -inf when the chunk is empty) straight from registers to GMEM; `combine_splits` merges
them. With C = 512, Q, the ring and P fill 224 of the 227 KiB of SMEM.

Shapes: Q = 64 rows per CTA (T*N padded up), H = C / 2 a multiple of 64 up to 256 (one wgmma
N), R and G multiples of 64, bf16 or f16 operands. Hopper only (sm_90a wgmma).

Interpret mode (`interpret=True`) runs Mosaic GPU's CPU interpreter and needs jax >= 0.11: the
0.10 interpreter cannot take transposed wgmma operands (K^T). The interpreter has no rule for
`run_state` either, so there P V goes to a fresh accumulator that is then added (same sum).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mla_decode.kernel_gpu import default_num_splits
from pallas_kernels.mla_decode.reference import paged_shape_error
from pallas_kernels.mla_decode.split_kv import combine_splits

# Mosaic GPU's interpreter runs this kernel from jax 0.11 (where its params became public).
INTERPRET_SUPPORTED = hasattr(plgpu, "InterpretGPUParams")

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_ROWS = 64  # query rows per CTA: one wgmma M tile per compute warpgroup
_SLOTS = 2  # pages in flight in the SMEM ring
_SMEM_BYTES = 227 * 1024  # H100 / H800 dynamic shared memory per CTA
_DTYPES = (jnp.bfloat16, jnp.float16)


def _smem_bytes(width: int, rope: int, page: int, itemsize: int = 2) -> int:
  q = _ROWS * (width + rope) * itemsize
  ring = _SLOTS * page * (width + rope) * itemsize
  return q + ring + _ROWS * page * itemsize + _ROWS * 4 + 1024  # + P, alpha and barriers


def unsupported_reason(q_shape, c_pages_shape, r_pages_shape, block_table_shape,
                       dtype=jnp.bfloat16) -> Optional[str]:
  """None when `mla_decode` handles these shapes, else why not (the caller falls back to XLA)."""
  error = paged_shape_error(q_shape, c_pages_shape, r_pages_shape, block_table_shape)
  if error is not None:
    return error
  (_, page, width), (_, _, rope) = c_pages_shape, r_pages_shape
  if jnp.dtype(dtype) not in map(jnp.dtype, _DTYPES):
    return f"wgmma kernel takes bf16 or f16, got {jnp.dtype(dtype).name}"
  if width % 128 or width > 512:
    return f"C must be a multiple of 128 up to 512 (two wgmma halves), got {width}"
  if rope % 64 or page % 64:
    return f"R and G must be multiples of 64 (128-byte swizzled tiles), got R={rope} G={page}"
  if q_shape[1] > page:
    return f"T={q_shape[1]} new tokens exceed a page (G={page})"
  if _smem_bytes(width, rope, page) > _SMEM_BYTES:
    return f"C={width}, R={rope}, G={page} need more than {_SMEM_BYTES} bytes of SMEM"
  return None


def _split_range(length, page: int, n_splits: int, k):
  """Pages [start, end) of split k and the row's valid page count."""
  n_valid = (length + page - 1) // page
  per_split = (n_valid + n_splits - 1) // n_splits
  start = k * per_split
  return start, jnp.minimum(start + per_split, n_valid), n_valid


def _producer(lengths_ref, table_ref, c_pages, r_pages, c_halves, r_smem, c_ready, r_ready,
              released, *, n_splits: int):
  """Warpgroup 2: TMA the split's pages into the SMEM ring, _SLOTS ahead of the consumers."""
  k, b = lax.axis_index("k"), lax.axis_index("b")
  _, page, half = c_halves[0].shape
  start, end, _ = _split_range(lengths_ref[b], page, n_splits, k)

  @pl.loop(start, end)
  def _(j):
    step = j - start
    slot = lax.rem(step, _SLOTS)

    @pl.when(step >= _SLOTS)
    def _():
      plgpu.barrier_wait(released.at[slot])

    pid = table_ref[b, j]  # only entries < n_valid are read: the rest are unspecified
    for w in range(2):
      plgpu.copy_gmem_to_smem(c_pages.at[pid, :, pl.ds(w * half, half)], c_halves[w].at[slot],
                              c_ready.at[2 * slot + w])
    plgpu.copy_gmem_to_smem(r_pages.at[pid], r_smem.at[slot], r_ready.at[slot])

  # Observe the last releases too, so that no barrier phase is left unobserved at exit (the
  # interpreter checks this; on the GPU the producer would idle here anyway).
  @pl.loop(jnp.maximum(start, end - _SLOTS), end)
  def _(j):
    plgpu.barrier_wait(released.at[lax.rem(j - start, _SLOTS)])


def _scores(q_smem, qr_smem, c_halves, r_smem, slot):
  """S [Q, G] f32 = Q_C K_C^T + Q_R K_R^T on the tensor cores, operands in SMEM."""
  page = r_smem.shape[1]

  def body(acc):
    for w in range(2):
      plgpu.wgmma(acc, q_smem.at[w], plgpu.transpose_ref(c_halves[w].at[slot], (1, 0)))
    plgpu.wgmma(acc, qr_smem, plgpu.transpose_ref(r_smem.at[slot], (1, 0)))
    return acc[...]

  return pl.run_scoped(body, plgpu.ACC((_ROWS, page), jnp.float32))


def _accumulate_pv(acc, p_smem, v_smem, alpha, interpret: bool):
  """acc * alpha + P V, with wgmma accumulating into acc's registers in place.

  Mosaic GPU's interpreter has no rule for `run_state` (the only way to seed a wgmma
  accumulator): there it adds the product of a fresh accumulator instead, the same sum.
  """
  acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

  def pv(acc_ref):
    plgpu.wgmma(acc_ref, p_smem, v_smem)

  if interpret:
    fresh = lambda acc_ref: (pv(acc_ref), acc_ref[...])[1]
    return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))
  return pl.run_state(pv)(plgpu.ACC.init(acc))


def _zero_past_length(v_smem, j, length, meet):
  """Zero the slots of page j at or past the row's length in this warpgroup's latent half.

  They may hold NaN, and P V would turn 0 * NaN into NaN. The two compute warpgroups then meet,
  so that neither reads the block again before both halves are clean.
  """
  page, half = v_smem.shape
  wgmma = plgpu.Layout.WGMMA
  v = plgpu.load(v_smem, (), layout=wgmma)
  in_row = j * page + plgpu.broadcasted_iota(jnp.int32, (page, half), 0, layout=wgmma) < length
  v_smem[...] = jnp.where(in_row, v, jnp.zeros_like(v))
  plgpu.commit_smem()
  plgpu.barrier_arrive(meet)
  plgpu.barrier_wait(meet)


def _softmax_warpgroup(refs, start, end, n_valid, length, *, scale: float, n_tokens: int,
                       n_heads: int, causal: bool, interpret: bool):
  """Warpgroup 0: scores, online softmax, P and its rescale factors for warpgroup 1; O_0."""
  (q_smem, qr_smem, c0_smem, c1_smem, r_smem, p_smem, alpha_smem, q_ready, c_ready, r_ready,
   released, p_ready, p_free, meet) = refs
  h = lax.axis_index("h")
  _, page, half = c0_smem.shape
  scale2 = scale * _LOG2E
  wgmma = plgpu.Layout.WGMMA

  plgpu.barrier_wait(q_ready)

  def visible(j):
    # Query row q is token t = q // N; with causal it sees slots < length - T + 1 + t. Built
    # only for the last page: [Q, G] int tiles cost 32 registers a thread each.
    iota = lambda dim: plgpu.broadcasted_iota(jnp.int32, (_ROWS, page), dim, layout=wgmma)
    token = jnp.minimum(lax.div(h * _ROWS + iota(0), n_heads), n_tokens - 1)  # padded rows
    limit = length - n_tokens + 1 + token if causal else length
    return j * page + iota(1) < limit

  def step(j, carry, masked: bool):
    acc, m, l = carry
    slot = lax.rem(j - start, _SLOTS)
    plgpu.barrier_wait(c_ready.at[2 * slot])
    plgpu.barrier_wait(c_ready.at[2 * slot + 1])
    plgpu.barrier_wait(r_ready.at[slot])
    if masked:
      _zero_past_length(c0_smem.at[slot], j, length, meet)
    s = _scores(q_smem, qr_smem, (c0_smem, c1_smem), r_smem, slot) * scale2
    if masked:
      s = jnp.where(visible(j), s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    # A row that has seen only masked slots keeps m = -inf: shift by 0 so exp gives 0, not NaN.
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(shift, s.shape, [0]))
    alpha = jnp.exp2(m - shift)
    l = l * alpha + p.sum(axis=1)

    @pl.when(j > start)
    def _():  # warpgroup 1 is done with the previous P and alpha
      plgpu.barrier_wait(p_free)

    p_smem[...] = p.astype(p_smem.dtype)
    alpha_smem[...] = alpha
    plgpu.commit_smem()
    plgpu.barrier_arrive(p_ready)
    acc = _accumulate_pv(acc, p_smem, c0_smem.at[slot], alpha, interpret)
    plgpu.barrier_arrive(released.at[slot])
    return acc, m_new, l

  carry = (plgpu.layout_cast(jnp.zeros((_ROWS, half), jnp.float32), wgmma),
           plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), wgmma.reduce(1)),
           plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), wgmma.reduce(1)))
  carry = lax.fori_loop(start, jnp.minimum(end, n_valid - 1),
                        functools.partial(step, masked=False), carry)
  acc, m, l = lax.fori_loop(jnp.maximum(start, n_valid - 1), end,
                            functools.partial(step, masked=True), carry)

  @pl.when(end > start)
  def _():
    plgpu.barrier_wait(p_free)

  alpha_smem[...] = l  # hand the final row sums to warpgroup 1
  plgpu.commit_smem()
  plgpu.barrier_arrive(p_ready)
  return acc, m, l


def _value_warpgroup(refs, start, end, n_valid, length, *, interpret: bool, **unused):
  """Warpgroup 1: O_1 += P V_1 with P and alpha from warpgroup 0; returns O_1 and the sums."""
  del unused  # the softmax warpgroup's statics
  (_, _, _, c1_smem, _, p_smem, alpha_smem, _, c_ready, _, released, p_ready, p_free,
   meet) = refs
  half = c1_smem.shape[2]
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def step(j, acc, masked: bool):
    slot = lax.rem(j - start, _SLOTS)
    plgpu.barrier_wait(c_ready.at[2 * slot + 1])
    if masked:
      _zero_past_length(c1_smem.at[slot], j, length, meet)
    plgpu.barrier_wait(p_ready)
    alpha = plgpu.load(alpha_smem, (), layout=row_layout)
    acc = _accumulate_pv(acc, p_smem, c1_smem.at[slot], alpha, interpret)
    plgpu.barrier_arrive(p_free)
    plgpu.barrier_arrive(released.at[slot])
    return acc

  acc = plgpu.layout_cast(jnp.zeros((_ROWS, half), jnp.float32), plgpu.Layout.WGMMA)
  acc = lax.fori_loop(start, jnp.minimum(end, n_valid - 1),
                      functools.partial(step, masked=False), acc)
  acc = lax.fori_loop(jnp.maximum(start, n_valid - 1), end,
                      functools.partial(step, masked=True), acc)
  plgpu.barrier_wait(p_ready)
  return acc, None, plgpu.load(alpha_smem, (), layout=row_layout)


def _consumer(lengths_ref, out_ref, lse_ref, refs, *, n_splits: int, **static):
  """Warpgroup w in {0, 1}: the online softmax over the split's pages for latent half w."""
  h, k, b = lax.axis_index("h"), lax.axis_index("k"), lax.axis_index("b")
  w = lax.axis_index("wg")
  _, page, half = refs[2].shape
  length = lengths_ref[b]
  start, end, n_valid = _split_range(length, page, n_splits, k)
  rows = pl.ds(h * _ROWS, _ROWS)

  def finish(acc, l, half_index):
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    # Straight from registers to GMEM: an f32 staging tile would not fit beside Q and the ring.
    out_ref.at[k, b, rows, pl.ds(half_index * half, half)][...] = (
        acc / lax.broadcast_in_dim(safe_l, acc.shape, [0]))
    return seen, safe_l

  @pl.when(w == 0)
  def _():
    acc, m, l = _softmax_warpgroup(refs, start, end, n_valid, length, **static)
    seen, safe_l = finish(acc, l, 0)
    lse_ref.at[k, b, rows][...] = jnp.where(seen, (m + jnp.log2(safe_l)) * _LN2, -jnp.inf)

  @pl.when(w == 1)
  def _():
    acc, _, l = _value_warpgroup(refs, start, end, n_valid, length, **static)
    finish(acc, l, 1)


def _kernel(lengths_ref, table_ref, q_ref, c_pages, r_pages, out_ref, lse_ref, *,
            n_splits: int, **static):
  """CTA (h, k, b): allocate SMEM and barriers shared by the three warpgroups, then dispatch."""
  width, rope = c_pages.shape[2], r_pages.shape[2]
  page, half, dtype = c_pages.shape[1], width // 2, c_pages.dtype
  swizzled = lambda shape: plgpu.SMEM(
      shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))

  def body(*refs):
    (q_smem, qr_smem, c0_smem, c1_smem, r_smem, _, _, q_ready, c_ready, r_ready, released,
     *_) = refs
    w = lax.axis_index("wg")
    h, b = lax.axis_index("h"), lax.axis_index("b")

    @pl.when(w == 0)
    def _():
      rows = pl.ds(h * _ROWS, _ROWS)
      for i in range(2):
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, pl.ds(i * half, half)], q_smem.at[i],
                                q_ready)
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, pl.ds(width, rope)], qr_smem, q_ready)

    @pl.when(w < 2)
    def _():
      plgpu.set_max_registers(240, action="increase")
      _consumer(lengths_ref, out_ref, lse_ref, refs, n_splits=n_splits, **static)

    @pl.when(w == 2)
    def _():
      plgpu.set_max_registers(24, action="decrease")
      _producer(lengths_ref, table_ref, c_pages, r_pages, (c0_smem, c1_smem), r_smem, c_ready,
                r_ready, released, n_splits=n_splits)

  pl.run_scoped(
      body,
      swizzled((2, _ROWS, half)),  # Q_C in two halves
      swizzled((_ROWS, rope)),  # Q_R
      swizzled((_SLOTS, page, half)),  # ring of latent pages, first half of the columns
      swizzled((_SLOTS, page, half)),  # ring of latent pages, second half
      swizzled((_SLOTS, page, rope)),  # ring of rope pages
      swizzled((_ROWS, page)),  # P, from warpgroup 0 to both PV products
      plgpu.SMEM((_ROWS,), jnp.float32),  # alpha per page, then the final row sums
      plgpu.Barrier(num_arrivals=3),  # q_ready: three TMA copies on one barrier
      plgpu.Barrier(num_barriers=2 * _SLOTS),  # c_ready[slot, half]
      plgpu.Barrier(num_barriers=_SLOTS),  # r_ready[slot]
      plgpu.Barrier(num_arrivals=2, num_barriers=_SLOTS),  # released: both consumers are done
      plgpu.Barrier(),  # p_ready
      plgpu.Barrier(),  # p_free
      plgpu.Barrier(num_arrivals=2),  # meet
      collective_axes="wg",
  )


@functools.partial(jax.jit, static_argnames=("softmax_scale", "causal", "num_splits", "block_h",
                                             "interpret"))
def mla_decode(q: jax.Array, c_pages: jax.Array, r_pages: jax.Array, lengths: jax.Array,
               block_table: jax.Array, *, softmax_scale: float, causal: bool = True,
               num_splits: Optional[int] = None, block_h: Optional[int] = None,
               interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Paged MLA decode; semantics of `reference.mla_decode_reference` with a block table.

  q [B,T,N,C+R], c_pages [P,G,C], r_pages [P,G,R], lengths [B] int32 (valid slots, the T new
  tokens included, 1 <= lengths <= M*G), block_table [B,M] int32. Returns (out [B,T,N,C] in
  q.dtype, lse [B,T,N] float32). block_h is accepted for the Triton kernel's signature and
  ignored: a CTA always takes 64 query rows (one wgmma M tile). interpret: run Mosaic GPU's
  interpreter on CPU (jax >= 0.11).
  """
  reason = unsupported_reason(q.shape, c_pages.shape, r_pages.shape, block_table.shape,
                              q.dtype)
  if reason is None and not q.dtype == c_pages.dtype == r_pages.dtype:
    reason = "q, c_pages and r_pages must share a dtype"
  if reason is None and interpret and not INTERPRET_SUPPORTED:
    reason = f"interpret mode needs jax >= 0.11 (Mosaic GPU interpreter), have {jax.__version__}"
  if reason is not None:
    raise ValueError(f"mla_decode (Mosaic GPU): {reason}")
  batch, n_tokens, n_heads, _ = q.shape
  width = c_pages.shape[-1]
  rows = n_tokens * n_heads
  n_blocks = pl.cdiv(rows, _ROWS)
  n_splits = num_splits or default_num_splits(batch, n_blocks, block_table.shape[1])

  q = q.reshape(batch, rows, q.shape[-1])  # token-major rows: free
  if rows % _ROWS:
    q = jnp.pad(q, ((0, 0), (0, n_blocks * _ROWS - rows), (0, 0)))
  kernel = functools.partial(_kernel, scale=softmax_scale, n_tokens=n_tokens, n_heads=n_heads,
                             n_splits=n_splits, causal=causal, interpret=interpret)
  out, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((n_splits, batch, n_blocks * _ROWS, width), jnp.float32),
                jax.ShapeDtypeStruct((n_splits, batch, n_blocks * _ROWS), jnp.float32)),
      # The head block is the fastest grid axis: CTAs that run together read the same pages,
      # so all but the first of them hit L2.
      grid=(n_blocks, n_splits, batch),
      grid_names=("h", "k", "b"),
      num_threads=3,
      thread_name="wg",
      # Row reductions of WGMMA-layout tiles stay within a warp: no SMEM scratch, which the
      # kernel could not spare (C = 512 leaves ~2 KiB free).
      compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(lengths.astype(jnp.int32), block_table.astype(jnp.int32), q, c_pages, r_pages)
  out, lse = combine_splits(out, lse)  # a no-op for one split
  out = out[:, :rows].reshape(batch, n_tokens, n_heads, width).astype(q.dtype)
  return out, lse[:, :rows].reshape(batch, n_tokens, n_heads)
