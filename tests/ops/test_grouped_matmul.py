"""Grouped matmul: every implementation equals a per-group loop, forward and gradient."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import config
from deepseek_jax.ops import grouped_matmul as gm
from deepseek_jax.ops.grouped_matmul import grouped_matmul

HAS_TOKAMAX = importlib.util.find_spec("tokamax") is not None
# Every implementation that runs on CPU: megablox in Pallas interpret mode, tokamax via XLA.
CPU_IMPLS = ["tiled", "ragged_dot", "megablox",
             pytest.param("tokamax", marks=pytest.mark.skipif(not HAS_TOKAMAX,
                                                              reason="pip install tokamax"))]


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


# (M, D, F, group_sizes, tile): small, since interpret mode costs grid steps x array size.
CASES = {
    "groups_straddle_tiles": (24, 8, 5, [5, 0, 12, 4], 8),  # 3 rows past the groups
    "default_tile_pads_m": (136, 8, 8, [0, 60, 0, 70], None),  # megablox: tm 128, M -> 256
    "several_lane_blocks": (16, 256, 384, [7, 0, 4], None),  # D, F in 256- / 128-wide blocks
}


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_per_row_reference(impl, case):
  m, d, f, sizes, tile = CASES[case]
  kx, kw, kc = jax.random.split(jax.random.key(m + d + f), 3)
  x, w = jax.random.normal(kx, (m, d)), jax.random.normal(kw, (len(sizes), d, f))
  cotangent = jax.random.normal(kc, (m, f))
  sizes = jnp.array(sizes, jnp.int32)
  group_of_row = jnp.repeat(jnp.arange(len(sizes)), sizes, total_repeat_length=m)
  used = (jnp.arange(m) < sizes.sum())[:, None]

  def reference(x, w):  # out[m] = x[m] @ w[group(m)], zero past the groups
    return jnp.einsum("MD,MDF->MF", x, w[group_of_row]) * used

  def candidate(x, w):
    return grouped_matmul(x, w, sizes, impl=impl, tile=tile)

  @jax.jit(static_argnums=0)
  def value_and_grads(fn, x, w):
    out, vjp = jax.vjp(fn, x, w)
    return (out,) + vjp(cotangent)

  for got, want in zip(value_and_grads(candidate, x, w), value_and_grads(reference, x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("backend, impl", [
    ("tpu", "megablox"), ("gpu", "tokamax" if HAS_TOKAMAX else "ragged_dot"), ("cpu", "tiled")])
def test_auto_picks_the_backends_implementation(monkeypatch, backend, impl):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert gm.resolve_impl("auto") == impl


def test_without_tokamax_gpu_falls_back_to_ragged_dot_and_tokamax_names_the_install(monkeypatch):
  monkeypatch.setattr(gm, "_import_tokamax", lambda: None)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert gm.resolve_impl("auto") == "ragged_dot"
  with pytest.raises(ImportError, match="pip install tokamax"):
    grouped_matmul(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.array([2]), impl="tokamax")


def test_unknown_impl_is_rejected_with_the_choices():
  with pytest.raises(ValueError, match="'auto', 'tiled', 'ragged_dot', 'megablox', 'tokamax'"):
    grouped_matmul(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.array([2]), impl="cublas")


def test_config_accepts_exactly_the_implemented_names():
  assert sorted(config.GROUPED_MATMUL_IMPLS) == sorted(("auto",) + gm.IMPLS)


def test_gather_rows_gradient_is_the_scatter_add_autodiff_would_give():
  from deepseek_jax.ops.rows import gather_rows
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


def test_a_pallas_impl_is_never_handed_to_xlas_partitioner(monkeypatch):
  """On a multi-device mesh outside shard_map XLA would have to split the call: "auto" picks
  ragged_dot there and an explicit Pallas kernel is refused with the way out."""
  from deepseek_jax.parallel.mesh import make_mesh
  monkeypatch.setattr(gm, "target_platform", lambda: "tpu")
  mesh = make_mesh({"data": 2}, jax.devices()[:2])
  with jax.set_mesh(mesh):
    assert gm.resolve_impl("auto") == "ragged_dot"
    with pytest.raises(ValueError, match="expert parallelism"):
      grouped_matmul(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.array([2]), impl="megablox")
  assert gm.resolve_impl("auto") == "megablox"  # one device: the kernel
