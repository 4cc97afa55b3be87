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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_matmul(x: jax.Array, w: jax.Array, fmt: str = "blockwise") -> jax.Array:
  """``x @ w`` with all three GEMMs in E4M3 (module doc): ``x`` [M, K] activations, ``w``
  [K, N] weights, any float dtypes; ``fmt`` "blockwise" (V3: 1x128 tiles, 128x128 blocks) or
  "tensorwise" (one scale per operand). Returns [M, N] in ``x.dtype``; gradients in the
  operands' dtypes, from FP8 Dgrad and Wgrad GEMMs. Raises ValueError for another ``fmt``."""
  return _forward(x, w, fmt)[0]


def _forward(x, w, fmt):
  if fmt not in FORMATS:
    raise ValueError(f"fp8 format must be one of {FORMATS}, got {fmt!r}")
  return _fprop(x, w, fmt).astype(x.dtype), (x, w)


def _backward(fmt, saved, g):
  x, w = saved
  g32 = g.astype(jnp.float32)
  if fmt == "tensorwise":
    dx = _gemm_tensorwise(g32, w.T)
    dw = _gemm_tensorwise(x.T, g32)
  else:
    dx = _gemm_tiles_blocks(g32, w, transpose_w=True)  # Dgrad: g [M, N] . W^T [N, K]
    dw = _gemm_tiles_tiles(x.T, g32)  # Wgrad: x^T [K, M] . g [M, N]
  return dx.astype(x.dtype), dw.astype(w.dtype)


fp8_matmul.defvjp(lambda x, w, fmt: _forward(x, w, fmt), _backward)


def relative_error(x: jax.Array, y: jax.Array) -> float:
  """DeepGEMM's GEMM error metric, 1 - 2 sum(x y) / sum(x^2 + y^2) (0 when equal), in f64
  on the host."""
  import numpy as np
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  denominator = (x * x + y * y).sum()
  return float(1 - 2 * (x * y).sum() / denominator) if denominator else 0.0


def fp8_einsum(eqn: str, x: jax.Array, w: jax.Array, fmt: str = "blockwise") -> jax.Array:
  """A weight matmul ``einsum(eqn, x, w)`` as one ``fp8_matmul``: ``x``'s free axes flatten to
  the rows M, the contracted axes to K, ``w``'s free axes to the columns N (so the weight is
  quantised as its 2-D [K, N] matrix, the layout of DeepSeek's FP8 checkpoints transposed),
  e.g. "BTD,DNH->BTNH" is [B*T, D] x [D, N*H]. Returns ``x.dtype``. Raises ValueError for an
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
  y = fp8_matmul(x2.reshape(m, k), w2.reshape(k, n), fmt)
  y = y.reshape([sizes[c] for c in x_free + w_free])
  return jnp.einsum(f"{''.join(x_free + w_free)}->{out}", y)
