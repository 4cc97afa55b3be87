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
  a = qa.astype(jnp.float32).reshape(m, k // block, block)
  b = qb.astype(jnp.float32).reshape(k // block, block, n)
  partial = jnp.einsum("mki,kin->mkn", a, b, preferred_element_type=jnp.float32)
  return jnp.einsum("mkn,mk,kn->mn", partial, sa, sb, preferred_element_type=jnp.float32)


def _repeat_columns(block_scale: jax.Array, n: int, block: int = BLOCK) -> jax.Array:
  """[K/block, Np/block] block scales -> [K/block, n] per-column scales."""
  return jnp.repeat(block_scale, block, axis=1)[:, :n]


def _gemm_tiles_blocks(a: jax.Array, w: jax.Array, transpose_w: bool = False) -> jax.Array:
  """a [M, K] in 1x128 tiles times the weight w [K, N] in 128x128 blocks, or (``transpose_w``)
  times wᵀ: the same blocks transposed, so Fprop and Dgrad read one quantised weight. Returns
  float32 [M, N] (or [M, K])."""
  qa, sa = quantize_tiles(a)
  qw, sw = quantize_blocks(w)
  if transpose_w:
    qw, sw = qw.T, sw.T
  n = w.shape[0] if transpose_w else w.shape[1]
  return scaled_dot(qa, sa, qw[:, :n], _repeat_columns(sw, n))


def _gemm_tiles_tiles(a_t: jax.Array, b: jax.Array) -> jax.Array:
  """Wgrad: a_t [K, M] and b [M, N], both in 1x128 tiles along the contraction M (a_t per
  row, b per column), float32 [K, N]."""
  qa, sa = quantize_tiles(a_t)  # [K, Mp], [K, Mp/128]
  qb_t, sb_t = quantize_tiles(b.T)  # [N, Mp], [N, Mp/128]
  return scaled_dot(qa, sa, qb_t.T, sb_t.T)


def _gemm_tensorwise(a: jax.Array, b: jax.Array) -> jax.Array:
  qa, sa = quantize_tensor(a)
  qb, sb = quantize_tensor(b)
  out = jnp.dot(qa.astype(jnp.float32), qb.astype(jnp.float32),
                preferred_element_type=jnp.float32)
  return out * (sa * sb)


def _fprop(x, w, fmt):
  if fmt == "tensorwise":
    return _gemm_tensorwise(x, w)
  return _gemm_tiles_blocks(x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fp8_matmul(x: jax.Array, w: jax.Array, fmt: str = "blockwise",
               cache_inputs: bool = False) -> jax.Array:
  """``x @ w`` with all three GEMMs in E4M3 (module doc): ``x`` [M, K] activations, ``w``
  [K, N] weights, any float dtypes; ``fmt`` "blockwise" (V3: 1x128 tiles, 128x128 blocks) or
  "tensorwise" (one scale per operand). ``cache_inputs`` keeps ``x`` for the backward pass as
  its E4M3 1x128 tiles and f32 scales (V3 §3.3.4: about half the bytes of BF16), which Wgrad
  dequantises and re-quantises along M. Returns [M, N] in ``x.dtype``; gradients in the
  operands' dtypes, from FP8 Dgrad and Wgrad GEMMs. Raises ValueError for another ``fmt``."""
  return _forward(x, w, fmt, cache_inputs)[0]


def _forward(x, w, fmt, cache_inputs):
  if fmt not in FORMATS:
    raise ValueError(f"fp8 format must be one of {FORMATS}, got {fmt!r}")
  saved = quantize_tiles(x) if cache_inputs else x
  return _fprop(x, w, fmt).astype(x.dtype), (saved, w)


def _backward(fmt, cache_inputs, saved, g):
  x, w = saved
  x_dtype = g.dtype  # the output's dtype is x's
  if cache_inputs:  # the cached tiles, dequantised (padding sliced off)
    x = dequantize_tiles(*x)[:, :w.shape[0]]
  g32 = g.astype(jnp.float32)
  if fmt == "tensorwise":
    dx = _gemm_tensorwise(g32, w.T)
    dw = _gemm_tensorwise(x.T, g32)
  else:
    dx = _gemm_tiles_blocks(g32, w, transpose_w=True)  # Dgrad: g [M, N] . W^T [N, K]
    dw = _gemm_tiles_tiles(x.T, g32)  # Wgrad: x^T [K, M] . g [M, N]
  return dx.astype(x_dtype), dw.astype(w.dtype)


fp8_matmul.defvjp(lambda x, w, fmt, cache_inputs: _forward(x, w, fmt, cache_inputs), _backward)


def relative_error(x: jax.Array, y: jax.Array) -> float:
  """DeepGEMM's GEMM error metric, 1 - 2 sum(x y) / sum(x^2 + y^2) (0 when equal), in f64
  on the host."""
  import numpy as np
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  denominator = (x * x + y * y).sum()
  return float(1 - 2 * (x * y).sum() / denominator) if denominator else 0.0


def fp8_einsum(eqn: str, x: jax.Array, w: jax.Array, fmt: str = "blockwise",
               cache_inputs: bool = False) -> jax.Array:
  """A weight matmul ``einsum(eqn, x, w)`` as one ``fp8_matmul``: ``x``'s free axes flatten to
  the rows M, the contracted axes to K, ``w``'s free axes to the columns N (so the weight is
  quantised as its 2-D [K, N] matrix, the layout of DeepSeek's FP8 checkpoints transposed),
  e.g. "BTD,DNH->BTNH" is [B*T, D] x [D, N*H]; ``cache_inputs`` as for ``fp8_matmul``.
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
  sizes = dict(zip(xs, x.shape)) | dict(zip(ws, w.shape))
  x2 = jnp.einsum(f"{xs}->{''.join(x_free + contracted)}", x)
  w2 = jnp.einsum(f"{ws}->{''.join(contracted + w_free)}", w)
  m = math.prod(sizes[c] for c in x_free)
  k = math.prod(sizes[c] for c in contracted)
  n = math.prod(sizes[c] for c in w_free)
  y = fp8_matmul(x2.reshape(m, k), w2.reshape(k, n), fmt, cache_inputs)
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
                product_args: tuple = ()) -> jax.Array:
  """A bilinear ``product(x, w, *product_args)`` (a grouped expert matmul: ``x`` [U, ..., K]
  rows, ``w`` [E, K, N] per-expert weights, ``product_args`` its integer group arrays) with its
  Fprop, Dgrad and Wgrad in E4M3 (section doc above): Fprop quantises ``x`` in 1x128 tiles
  along K and ``w`` in 128x128 blocks per expert; Dgrad the gradient in 1x128 tiles along N and
  the same weight blocks; Wgrad ``x`` and the gradient per column over row chunks (``starts``
  [U] bool, default every 128 units from the first). ``"tensorwise"``: one scale per operand.
  ``cache_inputs`` saves ``x`` for the backward pass as its E4M3 tiles and scales instead (V3
  §3.3.4; Wgrad then re-quantises the dequantised copy). ``product`` must not close over traced
  arrays (pass them in ``product_args``). Returns ``product``'s output in ``x.dtype``. Raises
  ValueError for another ``fmt``."""
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
