"""Grouped matmul: rows sorted by expert, each group multiplied by its own expert's weight.

Axis legend: M rows (token-expert assignments, sorted by expert), E experts, D in, F out.

    out[m] = x[m] @ w[g(m)]   where g(m) is the group of row m given group_sizes [E];
    rows past sum(group_sizes) (dropped assignments) produce zeros.

Two implementations behind ``grouped_matmul``:
- ``ragged_dot``: ``jax.lax.ragged_dot``; XLA lowers it to a real grouped GEMM on GPU/TPU, but on
  CPU to a dense masked dot costing E times the FLOPs.
- ``tiled``: each group is padded to a multiple of ``tile`` rows, so every tile belongs to one
  expert; a ``lax.scan`` over tiles does one [tile, D] x [D, F] matmul each. FLOPs are
  (M + E * tile) D F instead of E M D F: ~14x faster forward and ~6x backward than
  ``ragged_dot`` on a 2-core CPU (M=4096, D=256, F=512, E=16). Chosen automatically on CPU.
  The tile adapts to the rows per expert (a power of two near M / 4E, in [8, 128]) so the
  padding stays under ~25% of the work in training and a decode step of a few rows does not
  pay for 64-row tiles per expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _tiled(x: jax.Array, w: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
  m, d = x.shape
  e, _, f = w.shape
  n_tiles = -(-m // tile) + e  # each group wastes < 1 tile of padding
  padded = n_tiles * tile
  group_sizes = group_sizes.astype(jnp.int32)
  group_ends = jnp.cumsum(group_sizes)
  group_starts = group_ends - group_sizes
  pad_sizes = -(-group_sizes // tile) * tile
  pad_ends = jnp.cumsum(pad_sizes)
  pad_starts = pad_ends - pad_sizes

  row = jnp.arange(m)
  group = jnp.searchsorted(group_ends, row, side="right")  # == e for rows past all groups
  valid = group < e
  group = jnp.minimum(group, e - 1)
  dest = jnp.where(valid, pad_starts[group] + row - group_starts[group], padded)
  x_pad = jnp.zeros((padded, d), x.dtype).at[dest].set(x, mode="drop")
  tile_group = jnp.minimum(jnp.searchsorted(pad_ends, jnp.arange(n_tiles) * tile, side="right"),
                           e - 1)

  def one_tile(_, inputs):
    x_tile, g = inputs
    return None, jnp.dot(x_tile, w[g], preferred_element_type=jnp.float32).astype(x.dtype)

  _, out = jax.lax.scan(one_tile, None, (x_pad.reshape(n_tiles, tile, d), tile_group))
  out = out.reshape(padded, f)
  return jnp.where(valid[:, None], out[jnp.minimum(dest, padded - 1)], 0)


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
