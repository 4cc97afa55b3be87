"""FP8 GEMMs as DeepSeek-V3 trains with them (V3 §3.3, REFERENCE.md §5), emulated exactly in
f32 where no FP8 matrix unit exists.

Quantisation (online, from the current values; no delayed scaling):

    activation tiles  1 x 128   one scale per row and per 128 elements of the contracting axis
    weight blocks   128 x 128   one scale per 128 x 128 block
    scale = max(amax, 1e-4) / 448      q = clip(v / scale, -448, 448) in float8_e4m3fn

A GEMM over K accumulates each 128-wide K slice's product of E4M3 values in f32 and promotes
it into the f32 accumulator multiplied by the two scales of that slice (DeepGEMM's scheme):

    out[m, n] = sum_k  sa[m, k] * sb[k, n] * sum_{i in slice k} qa[m, i] * qb[i, n]

The product of two E4M3 values is exact in f32 and a 128-term sum of them is what the tensor
core accumulates, so this emulation is the arithmetic of the Hopper kernel up to the f32
summation order. ``fp8_matmul`` applies it to all three GEMMs of a linear layer through a
``custom_vjp``: Fprop x·W (x in 1x128 tiles, W in blocks), Dgrad g·Wᵀ (g in 1x128 tiles along
N, Wᵀ in the same blocks), Wgrad xᵀ·g (both in 1x128 tiles along the token axis M, V3 Fig. 7).
``"tensorwise"`` is the baseline most FP8 frameworks use: one scale per operand per GEMM.

Shapes need not be multiples of 128: operands are zero-padded to whole tiles (zeros do not
change a tile's amax or the product) and the result is sliced back.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
BLOCK = 128
FORMATS = ("blockwise", "tensorwise")


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  size = x.shape[axis]
  extra = -size % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def _scale(amax: jax.Array) -> jax.Array:
  return jnp.maximum(amax, AMAX_FLOOR) / E4M3_MAX


def _cast(x: jax.Array, scale: jax.Array) -> jax.Array:
  return jnp.clip(x / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def quantize_tiles(x: jax.Array, block: int = BLOCK):
  """1 x ``block`` tiles along the last axis: ``x`` [..., K] (any float dtype) ->
  (q [..., Kp] float8_e4m3fn, scale [..., Kp / block] float32), Kp = K rounded up to a
  multiple of ``block`` (zero padding). ``q * scale`` (per tile) approximates ``x``."""
  x = _pad_to(x.astype(jnp.float32), -1, block)
  tiles = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
  scale = _scale(jnp.max(jnp.abs(tiles), axis=-1))
  q = _cast(tiles, scale[..., None]).reshape(x.shape)
  return q, scale


def quantize_blocks(w: jax.Array, block: int = BLOCK):
  """``block`` x ``block`` blocks: ``w`` [K, N] -> (q [Kp, Np] float8_e4m3fn, scale [Kp /
  block, Np / block] float32), both axes zero-padded to multiples of ``block``. This is the
  layout of DeepSeek's FP8 checkpoints (``weight_scale_inv`` is ``scale`` of the [out, in]
  weight)."""
  w = _pad_to(_pad_to(w.astype(jnp.float32), 0, block), 1, block)
  kb, nb = w.shape[0] // block, w.shape[1] // block
  blocks = w.reshape(kb, block, nb, block)
  scale = _scale(jnp.max(jnp.abs(blocks), axis=(1, 3)))
  q = _cast(blocks, scale[:, None, :, None]).reshape(w.shape)
  return q, scale


def quantize_tensor(x: jax.Array):
  """One scale for the whole tensor (per-tensor current scaling): (q float8_e4m3fn, scale
  float32 [])."""
  x = x.astype(jnp.float32)
  scale = _scale(jnp.max(jnp.abs(x)))
  return _cast(x, scale), scale


def dequantize_tiles(q: jax.Array, scale: jax.Array, block: int = BLOCK) -> jax.Array:
  """Inverse of ``quantize_tiles`` (padded shape), float32."""
  tiles = q.astype(jnp.float32).reshape(*q.shape[:-1], q.shape[-1] // block, block)
  return (tiles * scale[..., None]).reshape(q.shape)


def dequantize_blocks(q: jax.Array, scale: jax.Array, block: int = BLOCK) -> jax.Array:
  """Inverse of ``quantize_blocks`` (padded shape), float32."""
  kb, nb = scale.shape
  blocks = q.astype(jnp.float32).reshape(kb, block, nb, block)
  return (blocks * scale[:, None, :, None]).reshape(q.shape)


def scaled_dot(qa: jax.Array, sa: jax.Array, qb: jax.Array, sb: jax.Array,
               block: int = BLOCK) -> jax.Array:
  """The block-scaled GEMM: ``qa`` [M, K] E4M3 with ``sa`` [M, K/block] (one scale per row and
  K slice), ``qb`` [K, N] E4M3 with ``sb`` [K/block, N] (one scale per K slice and column; a
  128x128 block scale repeated over its columns). Each K slice's E4M3 product is accumulated
  in f32, then promoted into the f32 result times ``sa * sb`` (module doc). Returns [M, N]
  float32."""
  m, k = qa.shape
  n = qb.shape[1]
  # E4M3 operands straight into dot_general with f32 accumulation: FP8 matrix units where the
  # hardware has them (``fp8_execution``); elsewhere XLA widens the values (exactly).
  a = qa.reshape(m, k // block, block)
  b = qb.reshape(k // block, block, n)
  partial = jnp.einsum("mki,kin->mkn", a, b, preferred_element_type=jnp.float32)
  return jnp.einsum("mkn,mk,kn->mn", partial, sa, sb, preferred_element_type=jnp.float32)


# TPU generations with FP8 matrix units (device_kind): Ironwood. v5e, v5p and v6e multiply
# BF16 / INT8, so XLA widens E4M3 operands there.
FP8_TPUS = ("TPU7x",)


def fp8_execution(platform: str, device_kind: str = "") -> str:
  """How the FP8 GEMMs of this module run on ``platform`` ("cpu" | "gpu" | "tpu") and
  ``device_kind`` (``jax.Device.device_kind``), as one phrase for the start-up log. The
  program is the same everywhere: E4M3 operands into ``dot_general`` per 128-wide K slice with
  f32 accumulation, and the promotion by the scales in f32."""
  if platform == "tpu" and device_kind in FP8_TPUS:
    return f"native: E4M3 dot_general on {device_kind}'s FP8 matrix units"
  if platform == "tpu":
    return (f"emulated: {device_kind or 'this TPU'} has no FP8 matrix units, XLA widens the "
            "E4M3 operands (exactly) for its BF16 units")
  if platform == "gpu":
    return "XLA: E4M3 dot_general per 128-K slice, f32 promotion (no block-scaled kernel)"
  return "emulated on CPU: E4M3 values, f32 products and accumulation"


def _repeat_columns(block_scale: jax.Array, n: int, block: int = BLOCK) -> jax.Array:
  """[K/block, Np/block] block scales -> [K/block, n] per-column scales."""
  return jnp.repeat(block_scale, block, axis=1)[:, :n]


def block_scaled_gemm(qa: jax.Array, sa: jax.Array, qw: jax.Array, sw: jax.Array) -> jax.Array:
  """The Fprop / Dgrad GEMM on quantised operands: ``qa`` [M, Kp] E4M3 with ``sa`` [M, Kp/128]
  (1x128 tiles) times ``qw`` [Kp, Np] E4M3 with ``sw`` [Kp/128, Np/128] (128x128 blocks),
  Kp and Np multiples of 128. Returns float32 [M, Np]. The XLA form (``scaled_dot``); a
  kernel with this signature can replace it (``fp8_matmul``'s ``gemm``)."""
  return scaled_dot(qa, sa, qw, _repeat_columns(sw, qw.shape[1]))


def _gemm_tiles_blocks(a: jax.Array, w: jax.Array, transpose_w: bool = False,
                       gemm=block_scaled_gemm) -> jax.Array:
  """a [M, K] in 1x128 tiles times the weight w [K, N] in 128x128 blocks, or (``transpose_w``)
  times wᵀ: the same blocks transposed, so Fprop and Dgrad read one quantised weight. Returns
  float32 [M, N] (or [M, K])."""
  qa, sa = quantize_tiles(a)
  qw, sw = quantize_blocks(w)
  if transpose_w:
    qw, sw = qw.T, sw.T
  n = w.shape[0] if transpose_w else w.shape[1]
  return gemm(qa, sa, qw, sw)[:, :n]  # both padded to whole 128s along the contraction


def _gemm_tiles_tiles(a_t: jax.Array, b: jax.Array) -> jax.Array:
  """Wgrad: a_t [K, M] and b [M, N], both in 1x128 tiles along the contraction M (a_t per
  row, b per column), float32 [K, N]."""
  qa, sa = quantize_tiles(a_t)  # [K, Mp], [K, Mp/128]
  qb_t, sb_t = quantize_tiles(b.T)  # [N, Mp], [N, Mp/128]
  return scaled_dot(qa, sa, qb_t.T, sb_t.T)


def _gemm_tensorwise(a: jax.Array, b: jax.Array) -> jax.Array:
  qa, sa = quantize_tensor(a)
  qb, sb = quantize_tensor(b)
  out = jnp.dot(qa, qb, preferred_element_type=jnp.float32)
  return out * (sa * sb)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def fp8_matmul(x: jax.Array, w: jax.Array, fmt: str = "blockwise",
               cache_inputs: bool = False, gemm=block_scaled_gemm) -> jax.Array:
  """``x @ w`` with all three GEMMs in E4M3 (module doc): ``x`` [M, K] activations, ``w``
  [K, N] weights, any float dtypes; ``fmt`` "blockwise" (V3: 1x128 tiles, 128x128 blocks) or
  "tensorwise" (one scale per operand; note: not the "fp8_"-prefixed names of
  ``ops.matmul.MatmulFormat``). ``cache_inputs`` keeps ``x`` for the backward pass as
  its E4M3 1x128 tiles and f32 scales (V3 §3.3.4: about half the bytes of BF16), which Wgrad
  dequantises and re-quantises along M. ``gemm`` runs the blockwise Fprop and Dgrad GEMMs
  (``block_scaled_gemm``'s signature; e.g. the Mosaic GPU kernel, which ``ops.matmul`` passes
  on Hopper); Wgrad stays ``scaled_dot``. Returns [M, N] in ``x.dtype``; gradients in the
  operands' dtypes, from FP8 Dgrad and Wgrad GEMMs. Raises ValueError for another ``fmt``."""
  return _forward(x, w, fmt, cache_inputs, gemm)[0]


def _forward(x, w, fmt, cache_inputs, gemm):
  if fmt not in FORMATS:
    raise ValueError(f"fp8 format must be one of {FORMATS}, got {fmt!r}")
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"fp8_matmul needs x [M, K] and w [K, N], got {x.shape} and {w.shape}")
  if not (jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(w.dtype, jnp.floating)):
    raise ValueError(f"fp8_matmul needs float operands, got {x.dtype} and {w.dtype}")
  saved = quantize_tiles(x) if cache_inputs else x
  out = _gemm_tensorwise(x, w) if fmt == "tensorwise" else _gemm_tiles_blocks(x, w, gemm=gemm)
  return out.astype(x.dtype), (saved, w)


def _backward(fmt, cache_inputs, gemm, saved, g):
  x, w = saved
  x_dtype = g.dtype  # the output's dtype is x's
  if cache_inputs:  # the cached tiles, dequantised (padding sliced off)
    x = dequantize_tiles(*x)[:, :w.shape[0]]
  g32 = g.astype(jnp.float32)
  if fmt == "tensorwise":
    dx = _gemm_tensorwise(g32, w.T)
    dw = _gemm_tensorwise(x.T, g32)
  else:
    dx = _gemm_tiles_blocks(g32, w, transpose_w=True, gemm=gemm)  # Dgrad: g [M, N] . W^T [N, K]
    dw = _gemm_tiles_tiles(x.T, g32)  # Wgrad: x^T [K, M] . g [M, N]
  return dx.astype(x_dtype), dw.astype(w.dtype)


fp8_matmul.defvjp(lambda x, w, fmt, cache_inputs, gemm: _forward(x, w, fmt, cache_inputs, gemm),
                  _backward)


def relative_error(x: jax.Array, y: jax.Array) -> float:
  """DeepGEMM's GEMM error metric, 1 - 2 sum(x y) / sum(x^2 + y^2) (0 when equal), in f64
  on the host."""
  import numpy as np
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  denominator = (x * x + y * y).sum()
  return float(1 - 2 * (x * y).sum() / denominator) if denominator else 0.0


def fp8_einsum(eqn: str, x: jax.Array, w: jax.Array, fmt: str = "blockwise",
               cache_inputs: bool = False, gemm=block_scaled_gemm) -> jax.Array:
  """A weight matmul ``einsum(eqn, x, w)`` as one ``fp8_matmul``: ``x``'s free axes flatten to
  the rows M, the contracted axes to K, ``w``'s free axes to the columns N (so the weight is
  quantised as its 2-D [K, N] matrix, the layout of DeepSeek's FP8 checkpoints transposed),
  e.g. "BTD,DNH->BTNH" is [B*T, D] x [D, N*H]; ``cache_inputs`` and ``gemm`` as for
  ``fp8_matmul``.
  Returns ``x.dtype``. Raises ValueError for an
  equation that is not activation x weight with disjoint free axes (a batched weight such as
  the experts' "EDF" shares an axis with the output: the grouped path handles those)."""
  inputs, out = eqn.replace(" ", "").split("->")
  xs, ws = inputs.split(",")
  contracted = [c for c in xs if c in ws and c not in out]
  x_free = [c for c in xs if c not in contracted]
  w_free = [c for c in ws if c not in contracted]
  if (not contracted or set(x_free) & set(w_free) or sorted(out) != sorted(x_free + w_free)
      or len(set(xs)) != len(xs) or len(set(ws)) != len(ws)):
    raise ValueError(f"fp8_einsum needs activation x weight with disjoint free axes, got {eqn!r}")
  if len(xs) != x.ndim or len(ws) != w.ndim or any(
      x.shape[xs.index(c)] != w.shape[ws.index(c)] for c in contracted):
    raise ValueError(f"fp8_einsum {eqn!r}: operand shapes {x.shape} and {w.shape} do not fit "
                     "the equation (ranks, or contracted sizes that differ)")
  sizes = dict(zip(xs, x.shape)) | dict(zip(ws, w.shape))
  x2 = jnp.einsum(f"{xs}->{''.join(x_free + contracted)}", x)
  w2 = jnp.einsum(f"{ws}->{''.join(contracted + w_free)}", w)
  m = math.prod(sizes[c] for c in x_free)
  k = math.prod(sizes[c] for c in contracted)
  n = math.prod(sizes[c] for c in w_free)
  y = fp8_matmul(x2.reshape(m, k), w2.reshape(k, n), fmt, cache_inputs, gemm)
  y = y.reshape([sizes[c] for c in x_free + w_free])
  return jnp.einsum(f"{''.join(x_free + w_free)}->{out}", y)


# --- the grouped (MoE) form and FP8 input caching ---------------------------------------------
#
# A grouped product (experts' weights [E, K, N], rows sorted or tiled by expert) is bilinear in
# its two operands, so its FP8 form needs no kernel of its own to be exact: each operand is
# quantised in V3's layout and dequantised to f32 ("fake quantisation": the same E4M3 values
# and scales), and the f32 product of those equals the block-scaled GEMM up to f32 summation
# order. The backward GEMMs reuse the product's own VJP on quantised operands, so every
# implementation (tiled, ragged_dot, megablox, tokamax) gets FP8 Dgrad and Wgrad.


def fake_quant_tiles(x: jax.Array) -> jax.Array:
  """``x`` [..., K] through 1x128 E4M3 tiles along its last axis and back: float32 [..., K]."""
  q, s = quantize_tiles(x)
  return dequantize_tiles(q, s)[..., :x.shape[-1]]


def fake_quant_blocks(w: jax.Array) -> jax.Array:
  """``w`` [..., K, N] through 128x128 E4M3 blocks per matrix (each expert its own) and back:
  float32, same shape."""
  k, n = w.shape[-2:]
  flat = w.reshape(-1, k, n)
  out = jax.vmap(lambda m: dequantize_blocks(*quantize_blocks(m))[:k, :n])(flat)
  return out.reshape(w.shape)


def fake_quant_tensor(x: jax.Array) -> jax.Array:
  """``x`` through one E4M3 scale for the whole tensor and back: float32."""
  q, s = quantize_tensor(x)
  return q.astype(jnp.float32) * s


def _segment_amax(amax: jax.Array, starts: jax.Array) -> jax.Array:
  """Per column, the max of ``amax`` [U, C] (>= 0) over each run of rows that begins where
  ``starts`` [U] (bool) is True, broadcast back to every row of the run. Two segmented
  associative scans (prefix max, then the run's last prefix carried back), no scatter."""

  def combine(left, right):
    (lf, lv), (rf, rv) = left, right
    return lf | rf, jnp.where(rf[..., None], rv, jnp.maximum(lv, rv))

  starts = starts.at[0].set(True)
  _, prefix = jax.lax.associative_scan(combine, (starts, amax))
  ends = jnp.concatenate([starts[1:], jnp.ones((1,), bool)])
  _, total = jax.lax.associative_scan(combine, (ends, prefix), reverse=True)
  return total


def fake_quant_columns(x: jax.Array, starts: jax.Array) -> jax.Array:
  """Wgrad's layout (V3 Fig. 7): ``x`` [U, ..., C] quantised per column along its rows, one
  scale per column and chunk of rows, a chunk running from each True of ``starts`` [U] to the
  next (a unit U may hold several rows, e.g. one expert tile [N, B, C]); float32, same shape.
  ``chunk_starts`` makes chunks of 128 rows that restart at each expert's first row, as
  DeepGEMM's grouped Wgrad sees them (each expert's rows padded to a multiple of 128)."""
  u, c = x.shape[0], x.shape[-1]
  x32 = x.astype(jnp.float32)
  unit_amax = jnp.max(jnp.abs(x32).reshape(u, -1, c), axis=1)
  scale = _scale(_segment_amax(unit_amax, starts)).reshape(u, *[1] * (x.ndim - 2), c)
  return _cast(x32, scale).astype(jnp.float32) * scale


def chunk_starts(unit_group: jax.Array, units_per_chunk: int) -> jax.Array:
  """[U] bool: where a Wgrad chunk begins, for units (rows, or tiles of rows) whose groups
  ``unit_group`` [U] (int) are contiguous: at each group's first unit and every
  ``units_per_chunk`` units after it."""
  index = jnp.arange(unit_group.shape[0])
  first = jnp.concatenate([jnp.ones((1,), bool), unit_group[1:] != unit_group[:-1]])
  group_start = jax.lax.cummax(jnp.where(first, index, 0))
  return (index - group_start) % units_per_chunk == 0


def fp8_product(product, x: jax.Array, w: jax.Array, fmt: str = "blockwise",
                starts: jax.Array | None = None, cache_inputs: bool = False,
                product_args: tuple = (), forward_gemm=None) -> jax.Array:
  """A bilinear ``product(x, w, *product_args)`` (a grouped expert matmul: ``x`` [U, ..., K]
  rows, ``w`` [E, K, N] per-expert weights, ``product_args`` its integer group arrays) with its
  Fprop, Dgrad and Wgrad in E4M3 (section doc above): Fprop quantises ``x`` in 1x128 tiles
  along K and ``w`` in 128x128 blocks per expert; Dgrad the gradient in 1x128 tiles along N and
  the same weight blocks; Wgrad ``x`` and the gradient per column over row chunks (``starts``
  [U] bool, default every 128 units from the first). ``"tensorwise"``: one scale per operand.
  ``cache_inputs`` saves ``x`` for the backward pass as its E4M3 tiles and scales instead (V3
  §3.3.4; Wgrad then re-quantises the dequantised copy). ``product`` must not close over traced
  arrays (pass them in ``product_args``). ``forward_gemm(x, w, *product_args)`` (blockwise
  only) replaces the Fprop by a kernel that quantises alike and returns f32 (the Mosaic GPU
  grouped GEMM); the backward GEMMs stay ``product``'s. Returns ``product``'s output in
  ``x.dtype``. Raises ValueError for another ``fmt``."""
  if fmt not in FORMATS:
    raise ValueError(f"fp8 format must be one of {FORMATS}, got {fmt!r}")
  if starts is None:
    starts = jnp.arange(x.shape[0]) % BLOCK == 0
  tensorwise = fmt == "tensorwise"
  rows_q = fake_quant_tensor if tensorwise else fake_quant_tiles
  weight_q = fake_quant_tensor if tensorwise else fake_quant_blocks
  out_dtype, k = x.dtype, x.shape[-1]

  def cols_q(a, starts):
    return fake_quant_tensor(a) if tensorwise else fake_quant_columns(a, starts)

  def forward(x, w, starts, args):
    if forward_gemm is not None and not tensorwise:
      return forward_gemm(x, w, *args).astype(out_dtype)
    return product(rows_q(x), weight_q(w), *args).astype(out_dtype)

  f = jax.custom_vjp(forward)

  def fwd(x, w, starts, args):
    saved = quantize_tiles(x) if cache_inputs else x
    return forward(x, w, starts, args), (saved, w, starts, args)

  def bwd(res, g):
    saved, w, starts, args = res
    x_hat = dequantize_tiles(*saved)[..., :k] if cache_inputs else saved.astype(jnp.float32)
    g32 = g.astype(jnp.float32)
    w_q = weight_q(w)
    _, dgrad = jax.vjp(lambda a: product(a, w_q, *args), x_hat)
    _, wgrad = jax.vjp(lambda b: product(cols_q(x_hat, starts), b, *args), w_q)
    (dx,), (dw,) = dgrad(rows_q(g32)), wgrad(cols_q(g32, starts))
    return dx.astype(out_dtype), dw.astype(w.dtype), None, jax.tree.map(lambda _: None, args)

  f.defvjp(fwd, bwd)
  return f(x, w, starts, tuple(product_args))


# --- FP8 weights kept for inference (released V3/R1 checkpoints) ------------------------------
#
# DeepSeek's FP8 checkpoints hold each linear weight as E4M3 values with one float32 scale per
# 128 x 128 block of the [out, in] matrix (REFERENCE.md §5). ``Fp8Weight`` keeps such a weight
# in our [in, out] layout instead of dequantising it on load: 1 byte per value plus 4 bytes per
# block (about 0.5x BF16). Its matmuls read the stored blocks: the block-scaled GEMM (``scaled_dot``
# with the activation in 1 x 128 tiles, no re-quantisation of the weight), or the weight
# dequantised to the compute dtype where the product runs in BF16 (as DeepSeek's inference does
# on its BF16 GEMM path). These forms have no FP8 backward pass: they serve inference.


@jax.tree_util.register_pytree_node_class
class Fp8Weight:
  """A weight held as E4M3 values and block scales, in our [in, out] einsum layout.

  Layout. ``q`` [*lead, *contracted, *free] float8_e4m3fn has the weight's logical shape:
  ``lead`` axes index independent matrices (a stack of layers, the experts), then the axes a
  weight matmul contracts (the input, HF's ``in``), then the ``n_out`` trailing free axes (the
  output, per-head axes included). Per lead index the weight's 2-D view is the [K, N] matrix
  ``q.reshape(*lead, K, N)``, K = prod(contracted), N = prod(free): the matrix ``fp8_einsum``
  flattens a weight to, and the transpose of the checkpoint's [out, in] tensor (HF flattens the
  per-head axes the same way). ``scale`` [*lead, ceil(K / bk), ceil(N / bn)] float32 holds one
  scale per ``block`` = (bk, bn) block of that view: bk rows of K by bn columns of N (V3:
  128 x 128; HF's ``weight_scale_inv`` transposed); the edge blocks of a K or N that is not a
  multiple have their own scales. The value is ``q * scale`` block-wise. The number of lead
  axes is ``scale.ndim - 2``, so slicing the leaves along a lead axis (``lax.scan`` over a
  layer stack) yields the Fp8Weight of each slice.

  ``dtype`` is the dtype of the weight's value: ``w[...]`` (and ``nnx.Param(w)[...]``) is the
  dequantised array in it, so code that reads a parameter's value (the MoE layer's expert
  weights, ``save_hf_checkpoint``) sees what the dequantising loader would have given;
  ``ops.matmul.weight_matmul`` reads the stored blocks instead. ``shape`` is the logical
  shape; ``nbytes`` the bytes stored (values + scales). A registered pytree (children ``q``,
  ``scale``; ``n_out``, ``block``, ``dtype`` static). Raises ValueError from the constructor
  when ``q`` is not float8_e4m3fn or the shapes do not match the layout above.
  """

  def __init__(self, q, scale, n_out: int = 1, block: tuple[int, int] = (BLOCK, BLOCK),
               dtype="bfloat16"):
    self.q, self.scale = q, scale
    self.n_out, self.block, self.dtype = int(n_out), tuple(int(b) for b in block), jnp.dtype(dtype)
    if jnp.dtype(q.dtype) != E4M3:
      raise ValueError(f"Fp8Weight values must be float8_e4m3fn, got {q.dtype}")
    lead = scale.ndim - 2
    k, n = self._matrix_dims()
    expected = tuple(q.shape[:lead]) + (-(-k // self.block[0]), -(-n // self.block[1]))
    if lead < 0 or not 1 <= self.n_out < q.ndim - lead or tuple(scale.shape) != expected:
      raise ValueError(f"Fp8Weight: values {tuple(q.shape)} with n_out={self.n_out} and "
                       f"{self.block} blocks need scales {expected}, got {tuple(scale.shape)}")

  def tree_flatten(self):
    return (self.q, self.scale), (self.n_out, self.block, self.dtype)

  @classmethod
  def tree_unflatten(cls, aux, children):
    w = object.__new__(cls)  # no checks: transformations unflatten placeholders
    w.q, w.scale = children
    w.n_out, w.block, w.dtype = aux
    return w

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.q.shape)

  @property
  def ndim(self) -> int:
    return len(self.q.shape)

  @property
  def lead(self) -> int:
    """The number of leading axes that index independent matrices."""
    return self.scale.ndim - 2

  @property
  def nbytes(self) -> int:
    return math.prod(self.q.shape) + 4 * math.prod(self.scale.shape)

  def _matrix_dims(self) -> tuple[int, int]:
    lead = self.scale.ndim - 2
    return (math.prod(self.q.shape[lead:self.ndim - self.n_out]),
            math.prod(self.q.shape[self.ndim - self.n_out:]))

  def matrix(self) -> jax.Array:
    """The values' 2-D view [*lead, K, N] float8_e4m3fn (a reshape, no copy)."""
    return self.q.reshape(*self.q.shape[:self.lead], *self._matrix_dims())

  def dequantize(self, dtype=None) -> jax.Array:
    """``q * scale`` block-wise, computed in float32 and cast to ``dtype`` (default
    ``self.dtype``): the logical shape."""
    k, n = self._matrix_dims()
    bk, bn = self.block
    s = jnp.repeat(jnp.repeat(self.scale, bk, axis=-2), bn, axis=-1)[..., :k, :n]
    w = self.matrix().astype(jnp.float32) * s
    return w.astype(dtype or self.dtype).reshape(self.shape)

  def __getitem__(self, index):
    return self.dequantize()[index]

  @classmethod
  def quantize(cls, w: jax.Array, n_out: int = 1, lead: int = 0, block: int = BLOCK,
               dtype=None) -> "Fp8Weight":
    """``w`` [*lead, *contracted, *free] (``lead`` and ``n_out`` axes counts) in ``block`` x
    ``block`` E4M3 blocks of each matrix's 2-D view (``quantize_blocks``, V3's recipe), the
    value dtype ``dtype`` (default ``w.dtype``)."""
    k = math.prod(w.shape[lead:w.ndim - n_out])
    n = math.prod(w.shape[w.ndim - n_out:])
    flat = w.reshape(-1, k, n)
    q, s = jax.vmap(lambda m: quantize_blocks(m, block))(flat)
    q = q[:, :k, :n].reshape(w.shape)
    return cls(q, s.reshape(*w.shape[:lead], *s.shape[1:]), n_out, (block, block),
               dtype or w.dtype)

  def __repr__(self):
    return (f"Fp8Weight(shape={self.shape}, n_out={self.n_out}, block={self.block}, "
            f"dtype={self.dtype})")


def fp8_weight_einsum(eqn: str, x: jax.Array, w: Fp8Weight) -> jax.Array:
  """``einsum(eqn, x, w)`` as the block-scaled GEMM on ``w``'s stored blocks: ``x``'s free axes
  flatten to the rows M and its contracted axes to K, quantised in 1 x bk tiles
  (``quantize_tiles``), then ``scaled_dot`` with the [K, N] view of ``w.q`` and its scales
  (each block's scale repeated over its bn columns); the weight is not re-quantised. Forward
  only (inference). Returns ``x.dtype``, shape as the einsum's. Raises ValueError unless ``eqn``
  is activation x weight with ``w``'s contracted axes its leading axes, in its order, and its
  ``n_out`` trailing axes free (``w`` without lead axes)."""
  inputs, out = eqn.replace(" ", "").split("->")
  xs, ws = inputs.split(",")
  contracted = [c for c in ws if c in xs and c not in out]
  x_free = [c for c in xs if c not in contracted]
  w_free = [c for c in ws if c not in contracted]
  if (w.lead or len(ws) != w.ndim or list(ws) != contracted + w_free or len(w_free) != w.n_out
      or set(x_free) & set(w_free) or sorted(out) != sorted(x_free + w_free)
      or len(set(xs)) != len(xs)):
    raise ValueError(f"fp8_weight_einsum needs activation x weight contracting the weight's "
                     f"{w.ndim - w.n_out} leading axes ({w!r}), got {eqn!r}")
  if len(xs) != x.ndim or len(ws) != w.ndim or any(
      x.shape[xs.index(c)] != w.shape[ws.index(c)] for c in contracted):
    raise ValueError(f"fp8_einsum {eqn!r}: operand shapes {x.shape} and {w.shape} do not fit "
                     "the equation (ranks, or contracted sizes that differ)")
  sizes = dict(zip(xs, x.shape)) | dict(zip(ws, w.shape))
  m = math.prod(sizes[c] for c in x_free)
  k = math.prod(sizes[c] for c in contracted)
  n = math.prod(sizes[c] for c in w_free)
  x2 = jnp.einsum(f"{xs}->{''.join(x_free + contracted)}", x).reshape(m, k)
  bk, bn = w.block
  qa, sa = quantize_tiles(x2, bk)
  qw = _pad_to(w.matrix(), 0, bk)
  y = scaled_dot(qa, sa, qw, _repeat_columns(w.scale, n, bn), bk)
  y = y.astype(x.dtype).reshape([sizes[c] for c in x_free + w_free])
  return jnp.einsum(f"{''.join(x_free + w_free)}->{out}", y)


def fp8_weight_product(product, x: jax.Array, w: Fp8Weight, product_args: tuple = ()) -> jax.Array:
  """A bilinear ``product(x, w, *product_args)`` (the grouped expert matmul: ``x`` [U, ..., K]
  rows, ``w`` [E, K, N] one matrix per expert) on ``w``'s stored blocks: ``x`` through 1 x bk
  E4M3 tiles along K and ``w`` dequantised to float32 (its exact E4M3 values times their
  block scales), so the f32 product equals the block-scaled GEMM up to f32 summation order
  (the grouped section above). Forward only (inference). Returns ``x.dtype``."""
  k = x.shape[-1]
  q, s = quantize_tiles(x, w.block[0])
  x_q = dequantize_tiles(q, s, w.block[0])[..., :k]
  return product(x_q, w.dequantize(jnp.float32), *product_args).astype(x.dtype)


def fp8_weight_bytes(tree) -> dict:
  """What the ``Fp8Weight`` leaves of a pytree (e.g. ``nnx.state(model)``) hold: ``weights``
  (count), ``values``, ``fp8_bytes`` (E4M3 values), ``scale_bytes`` (float32 scales) and
  ``bf16_bytes`` (the same values in BF16, 2 bytes each), all ints."""
  kept = [leaf for leaf in jax.tree.leaves(tree, is_leaf=lambda a: isinstance(a, Fp8Weight))
          if isinstance(leaf, Fp8Weight)]
  values = sum(math.prod(w.shape) for w in kept)
  scales = sum(math.prod(w.scale.shape) for w in kept)
  return dict(weights=len(kept), values=values, fp8_bytes=values, scale_bytes=4 * scales,
              bf16_bytes=2 * values)
