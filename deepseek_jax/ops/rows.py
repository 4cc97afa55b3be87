"""Row gathers whose transpose is again a gather (XLA:CPU runs scatter-adds as slow loops).

Shared by the MoE's tile-space expert FFN (``ops.grouped_matmul``) and expert-parallel dispatch
(``parallel.expert_parallel``). Axis legend: M source rows, N output rows, K readers per row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def with_zero_row(x: jax.Array) -> jax.Array:
  """x [M, ...] with one zero row appended (index M reads zeros)."""
  return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])


@jax.custom_vjp
def gather_rows(x: jax.Array, src: jax.Array, inv: jax.Array) -> jax.Array:
  """out[i] = x[src[i]], a zero row where src[i] == len(x).

  ``inv`` [len(x), k] lists, for each row j of x, the k output rows that read it (len(out) for
  none), so the transpose is a gather too: dx[j] = sum_k dout[inv[j, k]]. Autodiff would
  transpose the gather into a scatter-add, which XLA:CPU runs as a slow loop.
  """
  return with_zero_row(x)[src]


def _gather_rows_fwd(x, src, inv):
  return gather_rows(x, src, inv), (src, inv)


def _gather_rows_bwd(residuals, dout):
  src, inv = residuals
  dx = with_zero_row(dout)[inv].sum(1)
  return dx, np.zeros(src.shape, jax.dtypes.float0), np.zeros(inv.shape, jax.dtypes.float0)


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)
