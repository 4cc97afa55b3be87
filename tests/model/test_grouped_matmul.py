"""Grouped matmul: both implementations equal a per-group loop, forward and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model.grouped_matmul import grouped_matmul


def _loop_reference(x, w, group_sizes):
  out, start = np.zeros((x.shape[0], w.shape[2]), np.float32), 0
  for g, size in enumerate(np.asarray(group_sizes)):
    out[start:start + size] = np.asarray(x[start:start + size]) @ np.asarray(w[g])
    start += size
  return out  # rows past sum(group_sizes) stay zero


GROUPINGS = {
    "balanced": [6, 6, 6, 6],
    "empty_groups": [0, 13, 0, 11],
    "all_in_one": [24, 0, 0, 0],
    "rows_dropped_at_end": [5, 3, 0, 9],  # 17 of 24 rows used
}


@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
def test_forward_matches_per_group_loop(impl, grouping):
  kx, kw = jax.random.split(jax.random.key(0))
  x, w = jax.random.normal(kx, (24, 8)), jax.random.normal(kw, (4, 8, 5))
  sizes = jnp.array(GROUPINGS[grouping], jnp.int32)
  out = grouped_matmul(x, w, sizes, impl=impl, tile=4)
  np.testing.assert_allclose(out, _loop_reference(x, w, sizes), atol=1e-5)


@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
def test_gradients_match_per_group_einsum(impl):
  kx, kw, kc = jax.random.split(jax.random.key(1), 3)
  x, w = jax.random.normal(kx, (24, 8)), jax.random.normal(kw, (4, 8, 5))
  cotangent = jax.random.normal(kc, (24, 5))
  sizes = jnp.array([5, 0, 12, 4], jnp.int32)  # 3 rows unused
  group_of_row = jnp.repeat(jnp.arange(4), sizes, total_repeat_length=24)
  used = (jnp.arange(24) < sizes.sum())[:, None]

  def reference(x, w):
    return (jnp.einsum("MD,MDF->MF", x, w[group_of_row]) * used * cotangent).sum()

  def candidate(x, w):
    return (grouped_matmul(x, w, sizes, impl=impl, tile=4) * cotangent).sum()

  for got, want in zip(jax.grad(candidate, (0, 1))(x, w), jax.grad(reference, (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_unknown_impl_is_rejected():
  with pytest.raises(ValueError, match="impl"):
    grouped_matmul(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.array([2]), impl="megablox")


def test_gather_rows_gradient_is_the_scatter_add_autodiff_would_give():
  from deepseek_jax.model.grouped_matmul import gather_rows
  # 3 source rows, 5 output rows: row 0 read twice, row 2 never, two outputs read the zero row.
  x = jax.random.normal(jax.random.key(2), (3, 4))
  src = jnp.array([0, 3, 1, 0, 3])
  inv = jnp.array([[0, 3], [2, 5], [5, 5]])  # readers of each source row; 5 = none
  cotangent = jax.random.normal(jax.random.key(3), (5, 4))

  def reference(x):
    return (jnp.concatenate([x, jnp.zeros((1, 4))])[src] * cotangent).sum()

  np.testing.assert_allclose(gather_rows(x, src, inv), jnp.concatenate([x, jnp.zeros((1, 4))])[src])
  np.testing.assert_allclose(jax.grad(lambda x: (gather_rows(x, src, inv) * cotangent).sum())(x),
                             jax.grad(reference)(x), atol=1e-6)
