"""Grouped matmul: rows sorted by expert, each group multiplied by its own expert's weight.

Axis legend: M rows (token-expert assignments, sorted by expert), E experts, D in, F out,
N tiles, B rows per tile.

    out[m] = x[m] @ w[g(m)]   where g(m) is the group of row m given group_sizes [E];
    rows past sum(group_sizes) (dropped assignments) produce zeros.

Two implementations behind ``grouped_matmul``:
- ``ragged_dot``: ``jax.lax.ragged_dot``; XLA lowers it to a real grouped GEMM on GPU/TPU, but on
  CPU to a dense masked dot costing E times the FLOPs.
- ``tiled`` (chosen on CPU): each group is padded to whole tiles of B rows, so every tile belongs
  to one expert, and one batched matmul "NBD,NDF->NBF" multiplies every tile by its expert's
  weight. FLOPs are (M + E B) D F instead of E M D F. The backward pass is written out
  (``custom_vjp``, megablox's gmm / tgmm split): dx is the same tiled product with W^T, and dW
  sums each tile's x^T dy into its expert. Padding and un-padding are gathers: XLA:CPU runs
  scatters as slow loops. The tile adapts to the rows per expert (a power of two near M / 4E,
  in [8, 128]) so the padding stays under ~25% of the work and a decode step of a few rows does
  not pay for large tiles.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class TileLayout(NamedTuple):
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


def _pad(x: jax.Array, layout: TileLayout, tile: int) -> jax.Array:
  """[M, D] -> [N, B, D] tiles (padding slots are zero rows)."""
  x_ext = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
  return x_ext[layout.rows].reshape(-1, tile, x.shape[1])


def _unpad(y_tiles: jax.Array, layout: TileLayout) -> jax.Array:
  y = y_tiles.reshape(-1, y_tiles.shape[-1])
  return jnp.where(layout.valid[:, None], y[layout.slot], 0)


def _tile_matmul(x_tiles, w, tile_group):
  return jnp.einsum("NBD,NDF->NBF", x_tiles, w[tile_group], preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled(x: jax.Array, w: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
  return _tiled_fwd(x, w, group_sizes, tile)[0]


def _tiled_fwd(x, w, group_sizes, tile):
  layout = tile_layout(group_sizes, x.shape[0], w.shape[0], tile)
  x_tiles = _pad(x, layout, tile)
  out = _unpad(_tile_matmul(x_tiles, w, layout.tile_group), layout).astype(x.dtype)
  return out, (x_tiles, w, group_sizes, layout)


def _tiled_bwd(tile, residuals, dy):
  x_tiles, w, group_sizes, layout = residuals
  dy_tiles = _pad(dy, layout, tile)
  dx = _unpad(_tile_matmul(dy_tiles, jnp.swapaxes(w, 1, 2), layout.tile_group), layout)
  per_tile = jnp.einsum("NBD,NBF->NDF", x_tiles, dy_tiles, preferred_element_type=jnp.float32)
  owner = jax.nn.one_hot(layout.tile_group, w.shape[0], dtype=jnp.float32)  # tiles -> experts
  dw = jnp.einsum("NE,NDF->EDF", owner, per_tile)
  return (dx.astype(x_tiles.dtype), dw.astype(w.dtype),
          np.zeros(group_sizes.shape, jax.dtypes.float0))


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def default_tile(rows: int, groups: int) -> int:
  """Largest power of two <= rows / (4 * groups), clipped to [8, 128]."""
  target = max(rows // (4 * groups), 1)
  return int(min(128, max(8, 1 << (target.bit_length() - 1))))


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
                   tile: int | None = None) -> jax.Array:
  """x [M, D] (sorted by group) @ w [E, D, F] per group -> [M, F]."""
  if impl == "auto":
    impl = "tiled" if jax.default_backend() == "cpu" else "ragged_dot"
  if impl == "tiled":
    return _tiled(x, w, group_sizes, tile or default_tile(x.shape[0], w.shape[0]))
  if impl == "ragged_dot":
    out = jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.astype(x.dtype)
  raise ValueError(f"grouped_matmul impl must be 'auto', 'tiled' or 'ragged_dot', got {impl!r}")
