"""FP8 numerics on CPU (V3 §3.3, REFERENCE.md §5): the quantisers, the block-scaled GEMM, the
error at scaled-down V3 GEMM shapes in DeepGEMM's metric, outlier channels (tiles vs one scale
per tensor), and the custom VJP's FP8 Dgrad / Wgrad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.quant import fp8


def _normal(key, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)


def test_tiles_are_scaled_by_their_own_amax_and_round_trip_within_e4m3():
  x = _normal(0, (5, 300)).at[2, 130].set(50.0).at[4, :128].set(0.0)  # K = 300: padded
  q, scale = fp8.quantize_tiles(x)
  assert q.dtype == jnp.float8_e4m3fn and q.shape == (5, 384) and scale.shape == (5, 3)
  padded = np.pad(np.asarray(x), ((0, 0), (0, 84))).reshape(5, 3, 128)
  amax = np.abs(padded).max(-1)
  np.testing.assert_allclose(scale, np.maximum(amax, 1e-4) / 448, rtol=1e-6)
  assert scale[4, 0] == pytest.approx(1e-4 / 448)  # an all-zero tile: the amax floor
  assert float(np.abs(np.asarray(q.astype(jnp.float32))).max()) == 448.0
  back = np.asarray(fp8.dequantize_tiles(q, scale))[:, :300]
  # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, and a subnormal
  # step of scale * 2^-9 absolute.
  bound = 2.0 ** -4 * np.abs(x) + np.repeat(scale, 128, axis=1)[:, :300] * 2.0 ** -9
  assert (np.abs(back - np.asarray(x)) <= bound + 1e-12).all()


def test_weight_blocks_are_independent_and_match_the_checkpoint_layout():
  w = _normal(1, (260, 200))  # neither axis a multiple of 128
  q, scale = fp8.quantize_blocks(w)
  assert q.shape == (384, 256) and scale.shape == (3, 2)
  w2 = w.at[0, 0].set(1000.0)  # only block (0, 0) changes scale
  _, scale2 = fp8.quantize_blocks(w2)
  changed = np.asarray(scale2 != scale)
  assert changed[0, 0] and changed.sum() == 1
  back = np.asarray(fp8.dequantize_blocks(q, scale))[:260, :200]
  np.testing.assert_allclose(back, w, rtol=2 ** -4, atol=float(scale.max()) * 2 ** -9)


def test_scaled_dot_is_the_product_of_the_dequantised_operands():
  a, b = _normal(2, (16, 256)), _normal(3, (256, 96))
  qa, sa = fp8.quantize_tiles(a)
  qb, sb = fp8.quantize_blocks(b)
  out = fp8.scaled_dot(qa, sa, qb[:, :96], jnp.repeat(sb, 128, axis=1)[:, :96])
  ref = fp8.dequantize_tiles(qa, sa) @ fp8.dequantize_blocks(qb, sb)[:, :96]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


# V3's GEMM shapes (N, K) from DeepGEMM's table, N and K divided by 16, M = 64 tokens:
# K = 128 and 1024 are whole slices; 448 and 96 are not.
SHAPES = [(448, 128), (256, 448), (1536, 96), (448, 1024)]


@pytest.mark.parametrize("n, k", SHAPES)
def test_gemm_error_is_under_1e_3_in_deepgemms_metric(n, k):
  x, w = _normal(4, (64, k)), _normal(5, (k, n), 0.05)
  out = fp8.fp8_matmul(x, w)
  assert out.shape == (64, n) and out.dtype == jnp.float32
  error = fp8.relative_error(out, x @ w)
  assert error < 1e-3, error


@pytest.mark.parametrize("factor", [1e3, 1e4, 1e5])
def test_outlier_channels_cost_per_tensor_scaling_and_not_tiles(factor):
  x = _normal(6, (128, 2048))  # 16 tiles per row; the outliers sit in 2 of them
  outliers = jnp.array([7, 1300])  # two channels far larger than the rest
  x = x.at[:, outliers].multiply(factor)
  w = _normal(7, (2048, 256), 0.05)
  normal = np.setdiff1d(np.arange(2048), np.asarray(outliers))
  q, s = fp8.quantize_tiles(x)
  qt, st = fp8.quantize_tensor(x)
  # The activations' quantisation error on the ordinary channels. One scale for the tensor
  # puts them `factor` below the outliers; E4M3 spans 448 / 2^-9 ~ 2^18, so from ~1e4 they
  # reach its subnormals and lose their mantissa. With 1x128 tiles only the two tiles that
  # hold an outlier are affected.
  tiles = fp8.relative_error(fp8.dequantize_tiles(q, s)[:, normal], x[:, normal])
  tensor = fp8.relative_error((qt.astype(jnp.float32) * st)[:, normal], x[:, normal])
  exact = x @ w
  blockwise = fp8.relative_error(fp8.fp8_matmul(x, w, "blockwise"), exact)
  tensorwise = fp8.relative_error(fp8.fp8_matmul(x, w, "tensorwise"), exact)
  print(f"outliers x{factor:.0e}, ordinary channels: tiles {tiles:.2e} vs per-tensor "
        f"{tensor:.2e}; GEMM: blockwise {blockwise:.2e} vs tensorwise {tensorwise:.2e}")
  # Measured: x1e3 3.3e-4 vs 3.5e-4, x1e4 3.4e-4 vs 8.1e-4, x1e5 1.2e-3 vs 6.9e-2. The GEMM's
  # error is the outlier channels' (they dominate the product), so it hardly moves.
  assert tiles < 2e-3 and blockwise < 1e-3 and blockwise < tensorwise
  if factor >= 1e4:
    assert tiles * (2 if factor < 1e5 else 20) < tensor


def _fp8_backward_by_hand(x, w, g):
  """Dgrad and Wgrad from explicitly quantised operands (the recipe of V3 Fig. 7)."""
  qg, sg = fp8.quantize_tiles(g)  # along N
  qw, sw = fp8.quantize_blocks(w)
  k = w.shape[0]
  dx = fp8.dequantize_tiles(qg, sg)[:, :] @ fp8.dequantize_blocks(qw, sw)[:k].T
  qx, sx = fp8.quantize_tiles(x.T)  # along M
  qgt, sgt = fp8.quantize_tiles(g.T)  # along M
  dw = fp8.dequantize_tiles(qx, sx) @ fp8.dequantize_tiles(qgt, sgt).T
  return dx[:, :k] if dx.shape[1] > k else dx, dw


def test_the_custom_vjp_runs_dgrad_and_wgrad_in_fp8():
  x, w = _normal(8, (200, 300)), _normal(9, (300, 160), 0.05)  # M, K, N not multiples of 128
  g = _normal(10, (200, 160))
  _, vjp = jax.vjp(lambda a, b: fp8.fp8_matmul(a, b), x, w)
  dx, dw = vjp(g)
  hx, hw = _fp8_backward_by_hand(x, w, g)
  np.testing.assert_allclose(dx, hx, rtol=1e-4, atol=1e-4)  # the FP8 GEMMs, not f32 ones
  np.testing.assert_allclose(dw, hw, rtol=1e-4, atol=1e-3)
  # Against the exact gradients: within DeepGEMM's GEMM tolerance, as BF16 is.
  ex, ew = jax.vjp(lambda a, b: a @ b, x, w)[1](g)
  bx, bw = jax.vjp(lambda a, b: (a.astype(jnp.bfloat16) @ b.astype(jnp.bfloat16)),
                   x, w)[1](g.astype(jnp.bfloat16))
  for fp, exact, bf in ((dx, ex, bx), (dw, ew, bw)):
    err, bf_err = fp8.relative_error(fp, exact), fp8.relative_error(bf, exact)
    assert err < 1e-3 and bf_err < 1e-4, (err, bf_err)
  assert fp8.relative_error(dx, hx) < 1e-9


def test_bfloat16_operands_keep_their_dtypes_and_tensorwise_runs():
  x = _normal(11, (32, 256)).astype(jnp.bfloat16)
  w = _normal(12, (256, 64), 0.05).astype(jnp.bfloat16)
  for fmt in fp8.FORMATS:
    out, vjp = jax.vjp(lambda a, b: fp8.fp8_matmul(a, b, fmt), x, w)
    dx, dw = vjp(jnp.ones_like(out))
    assert (out.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
    assert fp8.relative_error(out, x.astype(jnp.float32) @ w.astype(jnp.float32)) < 2e-3
  with pytest.raises(ValueError, match="fp8 format must be one of"):
    fp8.fp8_matmul(x, w, "e5m2")
  with pytest.raises(ValueError, match=r"x \[M, K\] and w \[K, N\], got \(32, 256\) and "
                                       r"\(255, 64\)"):  # never a silently dropped column
    fp8.fp8_matmul(x, w[:255])
  with pytest.raises(ValueError, match="float operands"):
    fp8.fp8_matmul(jnp.ones((4, 8), jnp.int32), w[:8])
  with pytest.raises(ValueError, match="do not fit the equation"):
    fp8.fp8_einsum("mk,kn->mn", x, w[:255])


def test_it_jits_and_takes_gradients_through_a_loss():
  x, w = _normal(13, (64, 128)), _normal(14, (128, 32), 0.1)
  loss = jax.jit(jax.grad(lambda b: jnp.sum(fp8.fp8_matmul(x, b) ** 2)))
  exact = jax.grad(lambda b: jnp.sum((x @ b) ** 2))(w)
  assert fp8.relative_error(loss(w), exact) < 2e-3


# --- the grouped (MoE) form, Wgrad's row chunks, FP8 input caching -------------------------


def test_segment_amax_is_the_max_over_each_run_of_rows():
  rng = np.random.default_rng(0)
  amax = np.abs(rng.normal(size=(37, 5))).astype(np.float32)
  starts = rng.random(37) < 0.2
  got = np.asarray(fp8._segment_amax(jnp.asarray(amax), jnp.asarray(starts)))
  run = np.cumsum(np.where(np.arange(37) == 0, True, starts))  # run id of each row
  for r in np.unique(run):
    np.testing.assert_array_equal(got[run == r], np.broadcast_to(amax[run == r].max(0),
                                                                 got[run == r].shape))


def test_chunk_starts_restart_at_each_group():
  group = jnp.array([0] * 5 + [2] * 3 + [3] * 7)
  starts = np.asarray(fp8.chunk_starts(group, 3))
  assert np.flatnonzero(starts).tolist() == [0, 3, 5, 8, 11, 14]


def _group_rows(sizes):
  return np.repeat(np.arange(len(sizes)), sizes)


@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
def test_grouped_fp8_is_fp8_matmul_of_each_experts_rows(impl):
  """The grouped form with Wgrad chunks restarting at each expert (DeepGEMM's alignment)
  equals, expert by expert, the dense FP8 linear layer on that expert's rows: forward, dx and
  dW (the last to f32 summation order)."""
  from deepseek_jax.ops.grouped_matmul import grouped_matmul
  sizes = [130, 0, 77, 200]  # not multiples of 128; one expert gets nothing
  m, k, n = sum(sizes), 200, 136
  x, w, g = _normal(0, (m, k)), _normal(1, (4, k, n), 0.05), _normal(2, (m, n))
  group_sizes = jnp.array(sizes, jnp.int32)
  product = lambda a, b, s: grouped_matmul(a, b, s, impl=impl)
  starts = fp8.chunk_starts(jnp.asarray(_group_rows(sizes)), fp8.BLOCK)
  out, vjp = jax.vjp(lambda a, b: fp8.fp8_product(product, a, b, "blockwise", starts,
                                                  product_args=(group_sizes,)), x, w)
  dx, dw = vjp(g)
  begin = 0
  for e, size in enumerate(sizes):
    rows = slice(begin, begin + size)
    begin += size
    if not size:
      assert float(jnp.abs(dw[e]).max()) == 0.0
      continue
    ref, ref_vjp = jax.vjp(lambda a, b: fp8.fp8_matmul(a, b), x[rows], w[e])
    ref_dx, ref_dw = ref_vjp(g[rows])
    np.testing.assert_allclose(out[rows], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx[rows], ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw[e], ref_dw, rtol=1e-4, atol=1e-4)
  exact = grouped_matmul(x, w, group_sizes, impl=impl)
  assert 0 < fp8.relative_error(out, exact) < 1e-3


def test_grouped_fp8_tensorwise_and_cache_inputs():
  from deepseek_jax.ops.grouped_matmul import grouped_matmul
  sizes = [64, 100]
  x, w, g = _normal(0, (164, 256)), _normal(1, (2, 256, 128), 0.05), _normal(2, (164, 128))
  product = lambda a, b, s: grouped_matmul(a, b, s, impl="ragged_dot")
  args = (jnp.array(sizes, jnp.int32),)
  exact, exact_vjp = jax.vjp(lambda a, b: product(a, b, *args), x, w)
  results = {}
  for fmt, cache in (("blockwise", False), ("blockwise", True), ("tensorwise", False)):
    out, vjp = jax.vjp(lambda a, b: fp8.fp8_product(product, a, b, fmt, cache_inputs=cache,
                                                    product_args=args), x, w)
    results[fmt, cache] = (out, *vjp(g))
    for got, ref in zip(results[fmt, cache], (exact, *exact_vjp(g))):
      assert fp8.relative_error(got, ref) < 2e-3, (fmt, cache)
  (o1, dx1, dw1), (o2, dx2, dw2) = results["blockwise", False], results["blockwise", True]
  assert jnp.array_equal(o1, o2) and jnp.array_equal(dx1, dx2)  # caching changes Wgrad only
  assert not jnp.array_equal(dw1, dw2) and fp8.relative_error(dw1, dw2) < 1e-3


def test_cached_inputs_in_the_dense_layer_change_only_wgrad():
  x, w, g = _normal(0, (96, 300)), _normal(1, (300, 136), 0.05), _normal(2, (96, 136))
  runs = []
  for cache in (False, True):
    out, vjp = jax.vjp(lambda a, b: fp8.fp8_matmul(a, b, "blockwise", cache), x, w)
    runs.append((out, *vjp(g)))
  (o1, dx1, dw1), (o2, dx2, dw2) = runs
  assert jnp.array_equal(o1, o2) and jnp.array_equal(dx1, dx2)
  assert not jnp.array_equal(dw1, dw2) and fp8.relative_error(dw1, dw2) < 1e-3
  # What is saved for the backward pass: E4M3 tiles + one f32 scale per 128, not f32 inputs.
  for cache in (False, True):
    saved = jax.linearize(lambda a: fp8.fp8_matmul(a, w, "blockwise", cache), x)[1]
    kept = {(leaf.dtype, leaf.shape) for leaf in jax.tree.leaves(saved)}
    assert ((jnp.dtype(jnp.float8_e4m3fn), (96, 384)) in kept) == cache
    assert ((jnp.dtype(jnp.float32), (96, 300)) in kept) == (not cache)


def test_each_platform_says_how_it_runs_the_fp8_gemms():
  assert fp8.fp8_execution("tpu", "TPU7x").startswith("native")
  for kind in ("TPU v5 lite", "TPU v5", "TPU v6 lite"):
    assert fp8.fp8_execution("tpu", kind).startswith(f"emulated: {kind} has no FP8")
  assert fp8.fp8_execution("cpu").startswith("emulated on CPU")
  assert "XLA" in fp8.fp8_execution("gpu", "NVIDIA H100 80GB HBM3")


def test_the_block_scaled_gemm_gives_the_tpu_compiler_e4m3_operands():
  """Compiled ahead of time for Ironwood (FP8 matrix units): the per-slice dot_general keeps
  its float8_e4m3fn operands, so XLA:TPU can run it on them; a product of dequantised
  operands would not."""
  pytest.importorskip("libtpu", reason="TPU ahead-of-time compiles need libtpu (the test extra)")
  from jax.experimental import topologies
  from jax.sharding import SingleDeviceSharding
  device = topologies.get_topology_desc(platform="tpu", topology_name="tpu7x:2x2x1").devices[0]
  sharding = SingleDeviceSharding(device)
  args = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in
          (((256, 512), jnp.float8_e4m3fn), ((256, 4), jnp.float32),
           ((512, 384), jnp.float8_e4m3fn), ((4, 384), jnp.float32))]
  assert device.device_kind == "TPU7x"
  assert _dot_operand_types(jax.jit(fp8.scaled_dot).lower(*args).compile().as_text()) == {
      "f8e4m3fn"}
  # (XLA folds a plain widening convert into the dot too; scaling before the dot, as the
  # dequantise-then-multiply of the grouped form does, leaves it f32 operands.)
  dequantised = lambda qa, sa, qb, sb: jnp.dot(
      fp8.dequantize_tiles(qa, sa), fp8.dequantize_tiles(qb.T, sb.T).T)
  assert _dot_operand_types(jax.jit(dequantised).lower(*args).compile().as_text()) == {"f32"}


def _dot_operand_types(hlo: str) -> set:
  """Element types of the operands of every convolution / dot in optimised HLO text."""
  import re
  types = dict(re.findall(r"%([\w.-]+) = (\w+)\[", hlo))
  found = set()
  for line in hlo.splitlines():
    match = re.search(r"= \w+\[[^\]]*\][^ ]* (?:convolution|dot)\(([^)]*)\)", line)
    if match:
      found.update(types.get(name.strip().lstrip("%")) for name in match.group(1).split(","))
  return found
