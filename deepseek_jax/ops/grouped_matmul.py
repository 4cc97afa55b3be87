"""Grouped matmul: rows sorted by expert, each group multiplied by its own expert's weight.

Axis legend: M rows (token-expert assignments, sorted by expert), E experts, D in, F out,
N tiles, B rows per tile.

    out[m] = x[m] @ w[g(m)]   where g(m) is the group of row m given group_sizes [E];
    rows past sum(group_sizes) (dropped assignments) produce zeros.

Four implementations behind ``grouped_matmul``; ``impl="auto"`` takes megablox on TPU, tokamax
on GPU when it is installed (else ragged_dot), and tiled on CPU:
- ``ragged_dot``: ``jax.lax.ragged_dot``; XLA lowers it to a real grouped GEMM on GPU/TPU, but on
  CPU to a dense masked dot costing E times the FLOPs.
- ``megablox``: the Pallas TPU kernel ``jax.experimental.pallas.ops.tpu.megablox.gmm`` (its
  custom_vjp runs gmm with W^T for dx and tgmm for dW). It needs tm | M, so M is padded to a
  multiple of the row tile tm (``_megablox_row_tile``), and it leaves rows past the last group
  unwritten, so those rows of the output and of dx are zeroed here (``_rows_past_groups_zeroed``).
  Off TPU it runs in Pallas interpret mode (slow; for tests).
- ``tokamax``: ``tokamax.ragged_dot`` (optional package, ``pip install tokamax``), which picks
  its Triton / Mosaic-GPU kernel on GPU and falls back to XLA elsewhere. Its kernels promise
  nothing about rows past the groups, so they are zeroed as for megablox.
- ``tiled`` (chosen on CPU): each group is padded to whole tiles of B rows (``tile_layout``), so
  every tile belongs to one expert, and one batched matmul "NBD,NDF->NBF" multiplies every tile
  by its expert's weight (``tile_matmul``). FLOPs are (M + E B) D F instead of E M D F. The
  backward passes are written out (``custom_vjp``, megablox's gmm / tgmm split): dx is the same
  tiled product with W^T, and dW sums each tile's x^T dy into its expert. Moving rows into and
  out of tiles is ``gather_rows``, whose transpose is again a gather: XLA:CPU runs scatters as
  slow loops. The tile is a power of two near M / 2E, in [8, 128], so padding stays small and a
  decode step of a few rows does not pay for large tiles. The MoE layer uses the pieces
  directly and runs its whole SwiGLU in tile space (one gather in, one gather out).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import NamedTuple, Optional

import jax
from jax.experimental.pallas.ops.tpu import megablox
import jax.numpy as jnp
import numpy as np

from deepseek_jax.ops.rows import gather_rows
from pallas_kernels.platform import target_platform

IMPLS = ("tiled", "ragged_dot", "megablox", "tokamax")


class TileLayout(NamedTuple):
  """Rows padded into whole tiles of one expert each (``tile_layout``)."""

  rows: jax.Array  # [N*B] source row of each padded slot (M = a zero row)
  slot: jax.Array  # [M] padded slot of each row (for un-padding)
  valid: jax.Array  # [M] row belongs to some group
  tile_group: jax.Array  # [N] expert of each tile


def tile_layout(group_sizes: jax.Array, m: int, n_groups: int, tile: int) -> TileLayout:
  n_tiles = -(-m // tile) + n_groups  # each group wastes < 1 tile of padding
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  pad_sizes = -(-sizes // tile) * tile
  pad_ends = jnp.cumsum(pad_sizes)
  pad_starts = pad_ends - pad_sizes
  slots = jnp.arange(n_tiles * tile)
  slot_group = jnp.minimum(jnp.searchsorted(pad_ends, slots, side="right"), n_groups - 1)
  offset = slots - pad_starts[slot_group]
  rows = jnp.where((slots < pad_ends[-1]) & (offset < sizes[slot_group]),
                   starts[slot_group] + offset, m)
  row = jnp.arange(m)
  group = jnp.searchsorted(ends, row, side="right")
  valid = group < n_groups
  group = jnp.minimum(group, n_groups - 1)
  slot = pad_starts[group] + row - starts[group]
  return TileLayout(rows, jnp.where(valid, slot, 0), valid, slot_group[::tile])


@jax.custom_vjp
def tile_matmul(x_tiles: jax.Array, w: jax.Array, tile_group: jax.Array) -> jax.Array:
  """[N, B, D] tiles @ w[tile_group] [N, D, F] -> [N, B, F] (accumulated in f32).

  The weight gradient sums each tile's x^T dy into its expert with a one-hot contraction
  (megablox's tgmm) instead of autodiff's scatter-add.
  """
  out = jnp.einsum("NBD,NDF->NBF", x_tiles, w[tile_group], preferred_element_type=jnp.float32)
  return out.astype(x_tiles.dtype)


def _tile_matmul_fwd(x_tiles, w, tile_group):
  return tile_matmul(x_tiles, w, tile_group), (x_tiles, w, tile_group)


def _tile_matmul_bwd(residuals, dy):
  x_tiles, w, tile_group = residuals
  w_t = jnp.swapaxes(w, 1, 2)[tile_group]
  dx = jnp.einsum("NBF,NFD->NBD", dy, w_t, preferred_element_type=jnp.float32)
  per_tile = jnp.einsum("NBD,NBF->NDF", x_tiles, dy, preferred_element_type=jnp.float32)
  owner = jax.nn.one_hot(tile_group, w.shape[0], dtype=jnp.float32)  # tiles -> experts
  dw = jnp.einsum("NE,NDF->EDF", owner, per_tile)
  return (dx.astype(x_tiles.dtype), dw.astype(w.dtype),
          np.zeros(tile_group.shape, jax.dtypes.float0))


tile_matmul.defvjp(_tile_matmul_fwd, _tile_matmul_bwd)


def _tiled(x: jax.Array, w: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
  layout = tile_layout(group_sizes, x.shape[0], w.shape[0], tile)
  n_slots = layout.rows.shape[0]
  slot = jnp.where(layout.valid, layout.slot, n_slots)  # unused rows read the zero row
  x_tiles = gather_rows(x, layout.rows, slot[:, None]).reshape(-1, tile, x.shape[1])
  y = tile_matmul(x_tiles, w, layout.tile_group).reshape(n_slots, -1)
  return gather_rows(y, slot, layout.rows[:, None])


def default_tile(rows: int, groups: int) -> int:
  """Largest power of two <= rows / (2 * groups), clipped to [8, 128]."""
  target = max(rows // (2 * groups), 1)
  return int(min(128, max(8, 1 << (target.bit_length() - 1))))


def _lane_block(dim: int) -> int:
  """Largest of 512, 256, 128 dividing dim, else dim itself (a whole-dim block is always legal)."""
  return next((b for b in (512, 256, 128) if dim % b == 0), dim)


def _megablox_row_tile(rows: int, groups: int) -> int:
  """Rows per megablox tile tm: the largest of 512, 256, 128 that divides M and is at most
  max(128, M / E); each group boundary inside a tile costs a whole extra tile, so tm stays near
  the mean group size. M <= 128 is one whole-M tile; otherwise M is padded to a multiple of 128.
  """
  fits = [b for b in (512, 256, 128) if b <= max(128, rows // groups) and rows % b == 0]
  return fits[0] if fits else min(rows, 128)


@functools.cache
def _megablox_tiling(tm: int) -> Callable[[int, int, int], tuple[int, int, int]]:
  """gmm's tiling lookup (m, k, n) -> (tm, tk, tn). A lookup, not a fixed triple, because the
  backward calls see (M, F, D) for dx and (M, D, F) for dW; cached so jit sees one function."""
  return lambda m, k, n: (tm, _lane_block(k), _lane_block(n))


def _rows_past_groups_zeroed(kernel: Callable[[jax.Array], jax.Array], x: jax.Array,
                             group_sizes: jax.Array) -> jax.Array:
  """kernel(x) with the rows past sum(group_sizes) zeroed, in the output and (through the
  ``where`` on x, whose VJP is the same select) in dx, where the kernels leave garbage (NaN in
  Pallas interpret mode)."""
  used = (jnp.arange(x.shape[0]) < group_sizes.sum())[:, None]
  return jnp.where(used, kernel(jnp.where(used, x, 0)), 0)


def _megablox(x: jax.Array, w: jax.Array, group_sizes: jax.Array, tm: int,
              interpret: bool) -> jax.Array:
  m = x.shape[0]
  padded = -(-m // tm) * tm  # gmm needs tm | M; the pad rows are past the groups
  gmm = functools.partial(megablox.gmm, rhs=w, group_sizes=group_sizes,
                          preferred_element_type=jnp.float32, tiling=_megablox_tiling(tm),
                          interpret=interpret)
  x = jnp.pad(x, ((0, padded - m), (0, 0)))
  return _rows_past_groups_zeroed(gmm, x, group_sizes)[:m]


@functools.cache
def _import_tokamax():
  try:
    import tokamax
  except ImportError:
    return None
  from absl import flags
  # tokamax reads its options as absl flags and, if nobody has parsed them, parses sys.argv on
  # first use, which fails under pytest or Jupyter ("Unknown command line flag"): take defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


def _tokamax(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  tokamax = _import_tokamax()
  if tokamax is None:
    raise ImportError("grouped_matmul impl='tokamax' needs the tokamax package: "
                      "pip install tokamax")
  ragged_dot = functools.partial(tokamax.ragged_dot, rhs=w, group_sizes=group_sizes,
                                 preferred_element_type=jnp.float32)
  return _rows_past_groups_zeroed(ragged_dot, x, group_sizes)


def partitioned_by_xla() -> bool:
  """Whether XLA's SPMD partitioner splits this call over devices (a multi-device context mesh
  outside shard_map): it cannot partition a Pallas kernel, only ops such as ragged_dot."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and any(size > 1 and axis not in mesh.manual_axes
                                for axis, size in mesh.shape.items())


def resolve_impl(impl: str, platform: Optional[str] = None,
                 partitioned: Optional[bool] = None) -> str:
  """The implementation ``impl`` names; "auto" is megablox on TPU, tokamax on GPU (ragged_dot
  without it), tiled on CPU; ragged_dot where XLA partitions the call (no expert parallelism
  on a multi-device mesh). ``platform`` and ``partitioned`` default to the compilation context
  (``target_platform()``, ``partitioned_by_xla()``); the model resolves its choice once, with
  them given (``model.execution``). Raises ValueError for an unknown name."""
  if impl == "auto":
    backend = target_platform() if platform is None else platform
    partitioned = partitioned_by_xla() if partitioned is None else partitioned
    if backend in ("tpu", "gpu") and partitioned:
      return "ragged_dot"
    if backend == "tpu":
      return "megablox"
    if backend == "gpu":
      return "tokamax" if _import_tokamax() is not None else "ragged_dot"
    return "tiled"
  if impl not in IMPLS:
    choices = ", ".join(repr(name) for name in ("auto",) + IMPLS)
    raise ValueError(f"grouped_matmul impl must be one of {choices}, got {impl!r}")
  return impl


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
                   tile: int | None = None, interpret: bool | None = None) -> jax.Array:
  """x [M, D] (sorted by group) @ w [E, D, F] per group -> [M, F].

  ``tile`` is the rows per tile of tiled (default ``default_tile``) and megablox (default
  ``_megablox_row_tile``); ``interpret`` runs megablox in Pallas interpret mode (default: off
  TPU). Both are ignored by the other implementations.
  """
  impl = resolve_impl(impl)
  if impl in ("megablox", "tokamax") and partitioned_by_xla():
    raise ValueError(f"grouped_matmul impl={impl!r} is a Pallas kernel, which XLA cannot split "
                     "over the mesh: use expert parallelism (mesh.expert > 1), which runs it per "
                     "shard, or 'ragged_dot' (resolve_execution(cfg, mesh) chooses it for a "
                     "model run on this mesh; set_execution applies it to a built model)")
  sizes = group_sizes.astype(jnp.int32)
  if impl == "tiled":
    return _tiled(x, w, sizes, tile or default_tile(x.shape[0], w.shape[0]))
  if impl == "megablox":
    if interpret is None:
      interpret = target_platform() != "tpu"
    out = _megablox(x, w, sizes, tile or _megablox_row_tile(x.shape[0], w.shape[0]), interpret)
  elif impl == "tokamax":
    out = _tokamax(x, w, sizes)
  else:
    out = jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
  return out.astype(x.dtype)
