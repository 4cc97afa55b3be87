"""DeepSeek-V3's block-scaled FP8 GEMM on Hopper: a Pallas Mosaic GPU kernel (wgmma + TMA), in a
dense and an M-grouped (MoE) form.

Axis legend: M rows (tokens), N output columns, K the contraction, E experts (groups), B = 128
(the scale block and the K slice), W = 64 rows of one compute warpgroup; a CTA computes a
[2W, block_n] output tile, block_n 64 or 128.

How this works (DeepGEMM's scheme; V3 §3.3.2, REFERENCE.md §5). The operands are E4M3 with f32
scales: activations ``qa`` [M, K] in 1 x B tiles (``sa`` [M, K/B]), the weight ``qb`` [N, K] in
B x B blocks (``sb`` [N/B, K/B]). The kernel computes

    out[m, n] = sum_k  sa[m, k] * sb[n / B, k] * sum_{i in slice k} qa[m, i] * qb[n, i]

slice by slice: the tensor cores accumulate a slice's B E4M3 products into a fresh f32
accumulator (one wgmma, m64 x block_n x k128), the warpgroup waits for it and promotes it on the
CUDA cores into its own f32 accumulator in registers, times sa (one scale per row) times sb (one
scale for the whole tile: its block_n columns lie in one B-block, read from GMEM). Hopper's FP8
tensor-core accumulation keeps only about 14 bits (V3 §3.3.2): promoting every 128 products
confines that loss to one slice's partial sum, and the sum over slices is f32.
``deepseek_jax.quant.fp8.scaled_dot`` is the same arithmetic with exact slice sums.

One persistent CTA per SM walks the output tiles (in bands of 8 M tiles, M fastest within a
band, so that the CTAs that run together share their operand tiles in L2) with three warpgroups:
  * the producer (warpgroup 2) TMA-copies, per K slice, the [2W, B] activation tile, the
    [block_n, B] weight tile and the slice's 2W row scales into a ring of ``stages`` SMEM slots,
    refilling a slot once both consumers have released it; it runs ahead across tile
    boundaries, so the next tile's loads overlap this tile's epilogue;
  * warpgroups 0 and 1 each own W rows of the tile: wgmma, promotion, and an epilogue that casts
    the accumulator to the output dtype in a staging SMEM buffer and TMA-stores it (it waits
    for the previous tile's store only when it needs the buffer again).

Layouts. wgmma reads FP8 operands only K-major (no transposed FP8 operand exists on Hopper), so
the weight is [N, K] with K contiguous: PyTorch's and DeepSeek's checkpoint layout (``weight``
[out, in], ``weight_scale_inv`` [N/B, K/B]). ``weight_from_kn`` converts fp8.py's [K, N] weight
and [K/B, N/B] block scales. ``sa`` is taken in fp8.py's [M, K/B] and transposed here to
[K/B, M], so that a slice's row scales are one 512-byte TMA copy.

Grouped (MoE) form: DeepGEMM's M-grouped *contiguous* layout. The rows are sorted by expert and
each expert's run is padded to a multiple of 2W = 128 rows, so every 128-row tile belongs to one
expert; ``tile_groups`` [Mp/128] int32 names it, -1 marking a tile of padding only (skipped,
written as zeros). ``contiguous_layout`` builds the row positions and ``tile_groups`` from the
experts' group sizes. Weights [E, N, K], block scales [E, N/B, K/B].

Shapes that are not multiples of the tile are zero-padded outside the kernel (zero rows and
columns add nothing) and the result is sliced back.

Not done (DeepGEMM does them): split-K or smaller tiles to fill the SMs at small M (N=7168
with block_n 64 gives 112 tiles for 132 SMs at M <= 128), TMA multicast across a cluster,
output tiles wider than one 128-block.

Interpret mode (``interpret=True``) runs Mosaic GPU's CPU interpreter. On jax 0.10 that
interpreter is private, cannot read transposed wgmma operands and has no rules for layout casts
or ``plgpu.load``; there the weight tiles are fed [B, block_n] (N contiguous, a layout the GPU
rejects for FP8) and vectors are read without layouts, so 0.10 checks everything but the
weight's SMEM layout and the register layouts; from jax 0.11 the interpreter runs the GPU's
program.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def _interpret_params_class():
  """Mosaic GPU's interpreter parameters: public from jax 0.11. jax 0.10's private interpreter
  is not used: full test-suite runs that included it crashed later XLA:CPU compiles in the
  same process (segfaults, 3 of 3 runs), which runs of the same files alone did not."""
  return getattr(plgpu, "InterpretGPUParams", None)


INTERPRET_SUPPORTED = _interpret_params_class() is not None
# jax 0.11's interpreter reads transposed wgmma operands; 0.10's does not (module doc).
INTERPRETER_TRANSPOSES = hasattr(plgpu, "InterpretGPUParams")

E4M3 = jnp.float8_e4m3fn
BLOCK = 128  # scale granularity along K (and N for the weight): V3's 1x128 tiles, 128x128 blocks
_WG_ROWS = 64  # rows of one compute warpgroup: one wgmma M tile
BLOCK_M = 2 * _WG_ROWS  # rows of a CTA tile (two compute warpgroups)
BLOCK_NS = (64, 128)  # a tile's columns must lie in one 128-block (one weight scale)
OUT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_SMEM_BYTES = 227 * 1024  # H100 / H800 / H200 dynamic shared memory per CTA
_MAX_STAGES = 6
RASTER_BAND = 8  # M tiles per band of the tile order (tile_coords)
_H100_SMS = 132


def _stage_bytes(block_n: int) -> int:
  return BLOCK_M * BLOCK + block_n * BLOCK + BLOCK_M * 4  # A tile, B tile, row scales


def smem_bytes(block_n: int, stages: int, out_dtype=jnp.bfloat16) -> int:
  """SMEM one CTA needs: ``stages`` ring slots, the epilogue's staging tile and the barriers."""
  staging = BLOCK_M * block_n * jnp.dtype(out_dtype).itemsize
  return stages * _stage_bytes(block_n) + staging + 1024


def default_stages(block_n: int = 128, out_dtype=jnp.bfloat16) -> int:
  """The deepest ring (at most 6 slots) that fits in SMEM beside the staging tile."""
  free = _SMEM_BYTES - smem_bytes(block_n, 0, out_dtype)
  return max(2, min(_MAX_STAGES, free // _stage_bytes(block_n)))


def num_sms() -> int:
  """SMs of the GPU being compiled for: the abstract device's (ahead-of-time lowering), else the
  default device's; 132 (H100 / H800 / H200 SXM) when neither is a GPU."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  if device is not None and getattr(device, "num_cores", None):
    return device.num_cores
  device = jax.devices()[0]
  return device.core_count if device.platform == "gpu" else _H100_SMS


def weight_from_kn(qb_kn: jax.Array, sb_kn: jax.Array) -> tuple[jax.Array, jax.Array]:
  """fp8.py's weight layout -> the kernel's: ``qb_kn`` [..., K, N] E4M3 and ``sb_kn``
  [..., K/B, N/B] f32 (``quantize_blocks``) -> (qb [..., N, K], sb [..., N/B, K/B]). A transpose
  (one copy): do it once per weight, not per call."""
  return jnp.swapaxes(qb_kn, -1, -2), jnp.swapaxes(sb_kn, -1, -2)


def unsupported_reason(qa_shape, sa_shape, qb_shape, sb_shape, *, grouped: bool = False,
                       block_n: int = 128, stages: Optional[int] = None,
                       out_dtype=jnp.bfloat16, dtypes=None) -> Optional[str]:
  """None when ``fp8_gemm`` (``grouped``: ``fp8_grouped_gemm``) takes these shapes, else why
  not. ``dtypes``: optional (qa, sa, qb, sb) dtypes to check too."""
  if len(qa_shape) != 2 or len(sa_shape) != 2:
    return f"qa and sa must be 2-D, got {qa_shape} and {sa_shape}"
  weight_rank = 3 if grouped else 2
  if len(qb_shape) != weight_rank or len(sb_shape) != weight_rank:
    return f"qb and sb must be {weight_rank}-D, got {qb_shape} and {sb_shape}"
  m, k = qa_shape
  n, k2 = qb_shape[-2:]
  kb, nb = -(-k // BLOCK), -(-n // BLOCK)
  if k != k2:
    return f"qa [M, K] and qb [.., N, K] disagree on K: {k} vs {k2}"
  if tuple(sa_shape) != (m, kb):
    return f"sa must be [M, ceil(K/{BLOCK})] = {(m, kb)}, got {tuple(sa_shape)}"
  if tuple(sb_shape[-2:]) != (nb, kb):
    return f"sb must be [.., ceil(N/{BLOCK}), ceil(K/{BLOCK})] = {(nb, kb)}, got {sb_shape}"
  if grouped and qb_shape[0] != sb_shape[0]:
    return f"qb and sb disagree on the number of experts: {qb_shape[0]} vs {sb_shape[0]}"
  if grouped and m % BLOCK_M:
    return f"the contiguous layout pads each expert to {BLOCK_M} rows: M={m} is not a multiple"
  if block_n not in BLOCK_NS:
    return f"block_n must be one of {BLOCK_NS} (a tile within one 128-block), got {block_n}"
  if jnp.dtype(out_dtype) not in map(jnp.dtype, OUT_DTYPES):
    return f"out_dtype must be bf16, f16 or f32, got {jnp.dtype(out_dtype).name}"
  if stages is not None and (stages < 2 or smem_bytes(block_n, stages, out_dtype) > _SMEM_BYTES):
    return (f"stages={stages} must be >= 2 and fit {_SMEM_BYTES} bytes of SMEM "
            f"({smem_bytes(block_n, stages, out_dtype)} needed)")
  if dtypes is not None:
    want = (E4M3, jnp.float32, E4M3, jnp.float32)
    got = tuple(jnp.dtype(d) for d in dtypes)
    if got != tuple(map(jnp.dtype, want)):
      return f"(qa, sa, qb, sb) must be (e4m3fn, f32, e4m3fn, f32), got {[d.name for d in got]}"
  return None


def contiguous_layout(group_sizes: jax.Array, num_rows: int,
                      block_m: int = BLOCK_M) -> tuple[jax.Array, jax.Array, int]:
  """DeepGEMM's M-grouped contiguous layout for ``num_rows`` rows sorted by group, group g
  holding ``group_sizes[g]`` of them (int [E], summing to at most ``num_rows``; rows past the
  sum belong to no group). Each group's run is padded to a multiple of ``block_m`` rows.

  Returns (positions [num_rows] int32: each row's row in the padded layout, rows of no group
  mapped past the end, ``tile_groups`` [Mp / block_m] int32: each tile's group, -1 for tiles of
  padding only, Mp: the padded row count, static: ``num_rows`` rounded up plus one tile per
  group). Scatter with ``jnp.zeros((Mp, K)).at[positions].set(x, mode="drop")``, gather back with
  ``y[positions]`` (``mode="fill"`` for rows of no group)."""
  sizes = group_sizes.astype(jnp.int32)
  n_groups = sizes.shape[0]
  padded_rows = -(-num_rows // block_m) * block_m + n_groups * block_m
  padded = -(-sizes // block_m) * block_m
  start = jnp.cumsum(sizes) - sizes
  padded_start = jnp.cumsum(padded) - padded
  row = jnp.arange(num_rows, dtype=jnp.int32)
  group = jnp.searchsorted(jnp.cumsum(sizes), row, side="right").astype(jnp.int32)
  in_group = group < n_groups
  group_c = jnp.minimum(group, n_groups - 1)
  positions = jnp.where(in_group, padded_start[group_c] + row - start[group_c], padded_rows)
  tile_start = jnp.arange(padded_rows // block_m, dtype=jnp.int32) * block_m
  tile_group = jnp.searchsorted(jnp.cumsum(padded), tile_start, side="right").astype(jnp.int32)
  tile_groups = jnp.where(tile_group < n_groups, tile_group, -1)
  return positions.astype(jnp.int32), tile_groups, padded_rows


# --- the kernel ---------------------------------------------------------------------------------


def tile_coords(t, m_tiles: int, n_tiles: int, band: int = RASTER_BAND):
  """Output tile t in [0, m_tiles * n_tiles) -> (m tile, n tile): bands of ``band`` M tiles
  (the last one shorter), and within a band M fastest, then N. The CTAs that run together
  then read a few activation tiles and a few weight tiles, each from L2 after the first."""
  per_band = band * n_tiles
  first = lax.div(t, per_band) * band
  rows = jnp.minimum(band, m_tiles - first)
  r = t - lax.div(t, per_band) * per_band
  return first + lax.rem(r, rows), lax.div(r, rows)


def _tile(t, m_tiles: int, n_tiles: int, groups_ref):
  """Tile t -> (m tile, n tile, expert, whether it holds rows: None when dense)."""
  m, n = tile_coords(t, m_tiles, n_tiles)
  if groups_ref is None:
    return m, n, 0, None
  expert = groups_ref[m]
  return m, n, jnp.maximum(expert, 0), expert >= 0


def _slices(valid, k_steps: int):
  return k_steps if valid is None else jnp.where(valid, k_steps, 0)


def _producer(refs, cta, n_local, *, num_ctas, m_tiles, n_tiles, k_steps, block_n, stages, legacy):
  """Warpgroup 2: TMA each K slice's A tile, B tile and row scales into the ring."""
  groups_ref, a_ref, sa_ref, b_ref, _, a_smem, b_smem, sa_smem, loaded, consumed = refs

  def tile(i, base):
    m, n, expert, valid = _tile(cta + i * num_ctas, m_tiles, n_tiles, groups_ref)
    steps = _slices(valid, k_steps)

    @pl.loop(0, steps)
    def _(k):
      step = base + k
      slot = lax.rem(step, stages)

      @pl.when(step >= stages)
      def _():
        plgpu.barrier_wait(consumed.at[slot])

      rows, cols = pl.ds(m * BLOCK_M, BLOCK_M), pl.ds(n * block_n, block_n)
      ks = pl.ds(k * BLOCK, BLOCK)
      plgpu.copy_gmem_to_smem(a_ref.at[rows, ks], a_smem.at[slot], loaded.at[slot])
      b_tile = b_ref.at[expert, ks, cols] if legacy else b_ref.at[expert, cols, ks]
      plgpu.copy_gmem_to_smem(b_tile, b_smem.at[slot], loaded.at[slot])
      plgpu.copy_gmem_to_smem(sa_ref.at[k, rows], sa_smem.at[slot], loaded.at[slot])

    return base + steps

  total = lax.fori_loop(0, n_local, tile, jnp.int32(0))

  # Observe the last releases too, so that no barrier phase is left unobserved at exit (the
  # interpreter checks this; on the GPU the producer would idle here anyway).
  @pl.loop(jnp.maximum(total - stages, 0), total)
  def _(step):
    plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])


def _load_rows(ref, layout, legacy: bool):
  """A vector from SMEM in ``layout``; the 0.10 interpreter has no rule for ``plgpu.load`` or
  layouts, and reads it plainly."""
  return ref[...] if legacy else plgpu.load(ref, (), layout=layout)


def _slice_product(a_smem, b_smem, scales_smem, legacy: bool):
  """One K slice on the tensor cores: ([W, block_n] f32 product in a fresh accumulator, the W
  row scales, read from SMEM while the wgmma runs)."""

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, b_smem)
    scale_a = _load_rows(scales_smem, plgpu.Layout.WGMMA.reduce(1), legacy)
    return acc_ref[...], scale_a  # the read of acc_ref waits for the wgmma

  return pl.run_scoped(body, plgpu.ACC((_WG_ROWS, b_smem.shape[1]), jnp.float32))


def _consumer(refs, out_ref, out_smem, cta, n_local, *, num_ctas, m_tiles, n_tiles, k_steps,
              block_n, stages, legacy):
  """Warpgroup w in {0, 1}: rows [w W, (w + 1) W) of each tile: wgmma per K slice, promotion
  into the f32 accumulator times sa * sb, then the epilogue."""
  groups_ref, _, _, _, sb_ref, a_smem, b_smem, sa_smem, loaded, consumed = refs
  w = lax.axis_index("wg")
  rows = pl.ds(w * _WG_ROWS, _WG_ROWS)

  def tile(i, base):
    m, n, expert, valid = _tile(cta + i * num_ctas, m_tiles, n_tiles, groups_ref)
    n_block = lax.div(n * block_n, BLOCK)

    def step(k, acc):
      slot = lax.rem(base + k, stages)
      scale_b = sb_ref[expert, n_block, k]  # one scale for the tile (GMEM, cached)
      plgpu.barrier_wait(loaded.at[slot])
      b_tile = b_smem.at[slot]
      if not legacy:
        b_tile = plgpu.transpose_ref(b_tile, (1, 0))  # [block_n, B] -> [B, block_n], K-major
      partial, scale_a = _slice_product(a_smem.at[slot, rows], b_tile, sa_smem.at[slot, rows],
                                        legacy)
      plgpu.barrier_arrive(consumed.at[slot])  # the slot's A, B and scales are all read
      return acc + partial * lax.broadcast_in_dim(scale_a * scale_b, partial.shape, [0])

    zeros = jnp.zeros((_WG_ROWS, block_n), jnp.float32)
    if not legacy:  # the 0.10 interpreter has no rule for layout casts
      zeros = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
    steps = _slices(valid, k_steps)
    acc = lax.fori_loop(0, steps, step, zeros)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's store has read out_smem
    out_smem[...] = acc.astype(out_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(
        out_smem, out_ref.at[pl.ds(m * BLOCK_M + w * _WG_ROWS, _WG_ROWS),
                             pl.ds(n * block_n, block_n)])
    return base + steps

  lax.fori_loop(0, n_local, tile, jnp.int32(0))
  plgpu.wait_smem_to_gmem(0)


def _swizzled(shape, dtype):
  """SMEM in the swizzled 8-row tiles that wgmma and TMA want: 128-byte swizzle, or the row's
  width when narrower (only the 0.10 interpreter's [B, 64] weight tiles)."""
  swizzle = min(128, shape[-1] * jnp.dtype(dtype).itemsize)
  columns = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, columns)),
                                              plgpu.SwizzleTransform(swizzle)))


def _kernel(*refs, grouped: bool, num_ctas: int, total_tiles: int, block_n: int, stages: int,
            legacy: bool, **static):
  """CTA `sm`: allocate the ring, the staging tile and the barriers, then dispatch."""
  if grouped:
    groups_ref, a_ref, sa_ref, b_ref, sb_ref, out_ref = refs
  else:
    (a_ref, sa_ref, b_ref, sb_ref, out_ref), groups_ref = refs, None
  out_dtype = out_ref.dtype
  b_tile = (BLOCK, block_n) if legacy else (block_n, BLOCK)
  static = dict(static, num_ctas=num_ctas, block_n=block_n, stages=stages, legacy=legacy)

  def body(a_smem, b_smem, sa_smem, out_smem, loaded, consumed):
    w = lax.axis_index("wg")
    cta = lax.axis_index("sm")
    n_local = lax.div(total_tiles - cta + num_ctas - 1, num_ctas)  # >= 1: num_ctas <= tiles
    ring = (groups_ref, a_ref, sa_ref, b_ref, sb_ref, a_smem, b_smem, sa_smem, loaded, consumed)

    @pl.when(w < 2)
    def _():
      plgpu.set_max_registers(232, action="increase")
      _consumer(ring, out_ref, out_smem.at[w], cta, n_local, **static)

    @pl.when(w == 2)
    def _():
      plgpu.set_max_registers(40, action="decrease")
      _producer(ring, cta, n_local, **static)

  pl.run_scoped(
      body,
      _swizzled((stages, BLOCK_M, BLOCK), E4M3),  # activation tiles
      _swizzled((stages, *b_tile), E4M3),  # weight tiles
      plgpu.SMEM((stages, BLOCK_M), jnp.float32),  # the slice's row scales
      _swizzled((2, _WG_ROWS, block_n), out_dtype),  # epilogue staging, one per warpgroup
      plgpu.Barrier(num_arrivals=3, num_barriers=stages),  # loaded: three TMA copies
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # consumed: both warpgroups
      collective_axes="wg",
  )


def _pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def _run(qa, sa, qb, sb, tile_groups, *, out_dtype, block_n, stages, num_ctas, interpret):
  """Shared by both forms: validate, pad, launch, slice. qb/sb always carry an expert axis."""
  grouped = tile_groups is not None
  name = "fp8_grouped_gemm" if grouped else "fp8_gemm"
  weight_shape = qb.shape if grouped else qb.shape[1:]
  scale_shape = sb.shape if grouped else sb.shape[1:]
  reason = unsupported_reason(qa.shape, sa.shape, weight_shape, scale_shape, grouped=grouped,
                              block_n=block_n, stages=stages, out_dtype=out_dtype,
                              dtypes=(qa.dtype, sa.dtype, qb.dtype, sb.dtype))
  if reason is None and interpret and not INTERPRET_SUPPORTED:
    reason = f"interpret mode needs Mosaic GPU's interpreter, absent from jax {jax.__version__}"
  if reason is None and grouped and tile_groups.shape != (qa.shape[0] // BLOCK_M,):
    reason = (f"tile_groups must be [M / {BLOCK_M}] = [{qa.shape[0] // BLOCK_M}], "
              f"got {tile_groups.shape}")
  if reason is not None:
    raise ValueError(f"{name} (Mosaic GPU): {reason}")
  m, n = qa.shape[0], qb.shape[1]
  stages = stages or default_stages(block_n, out_dtype)
  qa = _pad_axis(_pad_axis(qa, 0, BLOCK_M), 1, BLOCK)
  sa_t = _pad_axis(sa, 0, BLOCK_M).T  # [K/B, Mp]: a slice's row scales are contiguous
  qb = _pad_axis(_pad_axis(qb, 1, block_n), 2, BLOCK)
  mp, k = qa.shape
  npad = qb.shape[1]
  legacy = interpret and not INTERPRETER_TRANSPOSES  # jax 0.10's interpreter (module doc)
  if legacy:
    qb = jnp.swapaxes(qb, 1, 2)  # [E, K, N]: N-contiguous weight tiles
  m_tiles, n_tiles = mp // BLOCK_M, npad // block_n
  total_tiles = m_tiles * n_tiles
  num_ctas = min(num_ctas or num_sms(), total_tiles)
  kernel = functools.partial(_kernel, grouped=grouped, num_ctas=num_ctas,
                             total_tiles=total_tiles, m_tiles=m_tiles, n_tiles=n_tiles,
                             k_steps=k // BLOCK,
                             block_n=block_n, stages=stages, legacy=legacy)
  operands = (qa, sa_t.astype(jnp.float32), qb, sb.astype(jnp.float32))
  if grouped:
    operands = (tile_groups.astype(jnp.int32),) + operands
  out = plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct((mp, npad), out_dtype),
      grid=(num_ctas,),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      interpret=_interpret_params_class()() if interpret else None,
  )(*operands)
  return out[:m, :n]


_STATIC = ("out_dtype", "block_n", "stages", "num_ctas", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def fp8_gemm(qa: jax.Array, sa: jax.Array, qb: jax.Array, sb: jax.Array, *,
             out_dtype=jnp.bfloat16, block_n: int = 128, stages: Optional[int] = None,
             num_ctas: Optional[int] = None, interpret: bool = False) -> jax.Array:
  """The block-scaled FP8 GEMM ``out = (qa . sa) @ (qb . sb)^T`` with f32 promotion per 128-K
  slice (module doc; V3 §3.3.2, DeepGEMM's ``fp8_gemm_nt``).

  qa [M, K] float8_e4m3fn activations, sa [M, ceil(K/128)] float32 (1x128 tiles, fp8.py's
  ``quantize_tiles``); qb [N, K] float8_e4m3fn weight, K contiguous (``weight_from_kn`` converts
  fp8.py's [K, N]), sb [ceil(N/128), ceil(K/128)] float32 (128x128 blocks). Any M, N, K: tiles
  are zero-padded. Returns [M, N] in ``out_dtype`` (bf16, f16 or f32), the f32 accumulator
  rounded once. block_n: output columns per CTA tile, 64 or 128 (64 gives twice the tiles for
  small M); stages: ring slots (default: the most that fit, up to 6); num_ctas: persistent CTAs
  (default: one per SM); interpret: Mosaic GPU's CPU interpreter. Hopper only (sm_90a). Raises
  ValueError for shapes, dtypes or settings the kernel does not take (``unsupported_reason``).
  """
  return _run(qa, sa, qb[None], sb[None], None, out_dtype=out_dtype, block_n=block_n,
              stages=stages, num_ctas=num_ctas, interpret=interpret)


@functools.partial(jax.jit, static_argnames=_STATIC)
def fp8_grouped_gemm(qa: jax.Array, sa: jax.Array, qb: jax.Array, sb: jax.Array,
                     tile_groups: jax.Array, *, out_dtype=jnp.bfloat16, block_n: int = 128,
                     stages: Optional[int] = None, num_ctas: Optional[int] = None,
                     interpret: bool = False) -> jax.Array:
  """The MoE form of ``fp8_gemm`` in DeepGEMM's M-grouped contiguous layout (module doc;
  DeepGEMM's ``m_grouped_fp8_gemm_nt_contiguous``): ``out[r] = (qa[r] . sa[r]) @ (qb[e] .
  sb[e])^T`` for each row r of a 128-row tile t with e = tile_groups[t] >= 0; rows of tiles with
  tile_groups[t] = -1 come back as zeros.

  qa [Mp, K] float8_e4m3fn with Mp a multiple of 128 (each expert's rows padded to whole tiles,
  ``contiguous_layout``), sa [Mp, ceil(K/128)] float32; qb [E, N, K] float8_e4m3fn experts'
  weights, K contiguous, sb [E, ceil(N/128), ceil(K/128)] float32; tile_groups [Mp/128] int32
  (an entry >= E is undefined behaviour: it is not checked on the device). Returns [Mp, N] in
  ``out_dtype``. Settings as for ``fp8_gemm``; raises ValueError likewise.
  """
  return _run(qa, sa, qb, sb, tile_groups, out_dtype=out_dtype, block_n=block_n, stages=stages,
              num_ctas=num_ctas, interpret=interpret)

