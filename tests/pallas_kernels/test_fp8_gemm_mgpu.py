"""The Mosaic GPU (Hopper) block-scaled FP8 GEMM against fp8.py's exact emulation, `scaled_dot`.

Three levels, from what any machine can check to what only a Hopper GPU can:
  * numerics in Mosaic GPU's CPU interpreter at small shapes (padding on every axis, several
    persistent CTAs, a ring that wraps within and across tiles, the grouped form with empty
    experts and padding tiles). jax 0.11 interprets the GPU's layout; jax 0.10's interpreter
    cannot read transposed wgmma operands and runs the weight N-contiguous (kernel doc);
  * DeepSeek-V3's GEMM shapes lowered for CUDA without a GPU, which runs the whole Pallas ->
    Mosaic GPU lowering (wgmma's FP8 operand checks, register layouts, TMA);
  * V3 shapes on a real Hopper GPU, skipped elsewhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.quant import fp8
from pallas_kernels.fp8_gemm import kernel_mgpu

S = jax.ShapeDtypeStruct
E4M3 = jnp.float8_e4m3fn

needs_interpreter = pytest.mark.skipif(
    not kernel_mgpu.INTERPRET_SUPPORTED,
    reason=f"jax {jax.__version__} has no Mosaic GPU interpreter (public from 0.11, private in "
           "0.10's jax._src.pallas.mosaic_gpu.interpret)")


def quantized(seed, m, n, k, n_experts=None):
  """Random activations in 1x128 tiles and weights in 128x128 blocks (fp8.py), weights in both
  layouts: ([K, N] + [K/128, N/128] for scaled_dot, [N, K] + [N/128, K/128] for the kernel).
  Row magnitudes vary over four decades so that the scales matter."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-2, 2, (m, 1))
  qa, sa = fp8.quantize_tiles(jnp.asarray(x, jnp.float32))
  experts = [None] if n_experts is None else range(n_experts)
  weights = [fp8.quantize_blocks(jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32))
             for _ in experts]
  qw, sw = (jnp.stack(a) for a in zip(*weights))
  qb, sb = kernel_mgpu.weight_from_kn(qw, sw)
  qb = qb[:, :n]  # the kernel takes the unpadded N; the scales stay per started block
  if n_experts is None:
    qw, sw, qb, sb = qw[0], sw[0], qb[0], sb[0]
  return qa, sa, qb, sb, qw, sw


def reference(qa, sa, qw, sw, n):
  """fp8.py's block-scaled GEMM, f32 [M, n]."""
  return fp8.scaled_dot(qa, sa, qw[:, :n], jnp.repeat(sw, fp8.BLOCK, axis=1)[:, :n])


def assert_close(out, want, out_dtype):
  out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
  assert out.shape == want.shape
  # f32: the same products summed in another order, so the error scales with the row's terms
  # (rows span four decades); bf16: one rounding of the f32 result.
  rtol = 1e-5 if out_dtype == jnp.float32 else 2 ** -8
  row_scale = np.abs(want).max(axis=1, keepdims=True)
  error = np.abs(out - want)
  assert np.all(error <= rtol * (np.abs(want) + row_scale)), float(np.max(error / row_scale))


# (M, N, K, block_n, out_dtype, stages, num_ctas)
CASES = [
    (300, 200, 500, 64, jnp.float32, None, 2),  # pads M, N, K; 6-slot ring wraps across tiles
    (200, 256, 896, 128, jnp.bfloat16, 2, 3),  # 7 slices through a 2-slot ring; bf16 out
    (1100, 64, 128, 64, jnp.float32, None, 5),  # 9 M tiles: two bands of the tile order
]


@needs_interpreter
@pytest.mark.parametrize("m,n,k,block_n,out_dtype,stages,num_ctas", CASES)
def test_interpreted_gemm_matches_scaled_dot(m, n, k, block_n, out_dtype, stages, num_ctas):
  qa, sa, qb, sb, qw, sw = quantized(m + n + k, m, n, k)
  out = kernel_mgpu.fp8_gemm(qa[:, :k], sa, qb[:, :k], sb, out_dtype=out_dtype, block_n=block_n,
                             stages=stages, num_ctas=num_ctas, interpret=True)
  assert out.dtype == out_dtype
  assert_close(out, reference(qa, sa, qw, sw, n), out_dtype)


@needs_interpreter
def test_interpreted_grouped_gemm_matches_each_experts_scaled_dot():
  sizes, n, k = [70, 0, 150, 1], 192, 256  # an empty expert, a one-row expert
  qa, sa, qb, sb, qw, sw = quantized(5, sum(sizes), n, k, n_experts=len(sizes))
  positions, tile_groups, padded = kernel_mgpu.contiguous_layout(jnp.asarray(sizes), sum(sizes))
  scatter = lambda x: jnp.zeros((padded, x.shape[1]), x.dtype).at[positions].set(x)
  out = kernel_mgpu.fp8_grouped_gemm(scatter(qa), scatter(sa), qb, sb, tile_groups,
                                     out_dtype=jnp.float32, block_n=64, num_ctas=3,
                                     interpret=True)
  assert out.shape == (padded, n)
  start = np.cumsum([0] + sizes)
  want = jnp.concatenate([reference(qa[a:b], sa[a:b], qw[e], sw[e], n)
                          for e, (a, b) in enumerate(zip(start[:-1], start[1:]))])
  assert_close(out[positions], want, jnp.float32)
  unused = np.ones(padded, bool)
  unused[np.asarray(positions)] = False
  assert not np.any(np.asarray(out)[unused])  # padding rows and padding-only tiles are zeros


@pytest.mark.parametrize("m_tiles,n_tiles,band", [(32, 56, 8), (9, 3, 8), (1, 56, 8), (5, 7, 2)])
def test_tile_order_visits_every_tile_once_in_bands_of_m_tiles(m_tiles, n_tiles, band):
  t = jnp.arange(m_tiles * n_tiles)
  m, n = (np.asarray(a) for a in kernel_mgpu.tile_coords(t, m_tiles, n_tiles, band))
  assert sorted(zip(m, n)) == [(i, j) for i in range(m_tiles) for j in range(n_tiles)]
  np.testing.assert_array_equal(m[:band * n_tiles] // band, 0)  # the first band comes first
  if m_tiles >= band:
    np.testing.assert_array_equal(m[:band], np.arange(band))  # M fastest within a band


def test_contiguous_layout_pads_each_expert_to_whole_tiles():
  positions, tile_groups, padded = kernel_mgpu.contiguous_layout(
      jnp.asarray([130, 0, 5, 128]), 270, block_m=128)
  assert padded == 3 * 128 + 4 * 128
  want = np.concatenate([np.arange(130), 256 + np.arange(5), 384 + np.arange(128),
                         [padded] * 7])  # 7 rows past the sum: no group, dropped
  np.testing.assert_array_equal(positions, want)
  np.testing.assert_array_equal(tile_groups, [0, 0, 2, 3, -1, -1, -1])


def test_unsupported_reason_accepts_v3_shapes_and_explains_the_rest():
  reason = kernel_mgpu.unsupported_reason
  assert reason((4096, 7168), (4096, 56), (2048, 7168), (16, 56)) is None
  assert reason((100, 500), (100, 4), (300, 500), (3, 4), block_n=64) is None
  assert reason((256, 7168), (256, 56), (8, 4096, 7168), (8, 32, 56), grouped=True) is None
  assert "disagree on K" in reason((128, 256), (128, 2), (128, 384), (1, 3))
  assert "sa must be" in reason((128, 256), (128, 3), (128, 256), (1, 2))
  assert "sb must be" in reason((128, 256), (128, 2), (256, 256), (1, 2))
  assert "multiple" in reason((200, 256), (200, 2), (2, 128, 256), (2, 1, 2), grouped=True)
  assert "block_n" in reason((128, 256), (128, 2), (128, 256), (1, 2), block_n=256)
  assert "out_dtype" in reason((128, 256), (128, 2), (128, 256), (1, 2), out_dtype=jnp.int8)
  assert "SMEM" in reason((128, 256), (128, 2), (128, 256), (1, 2), stages=7)
  assert "e4m3fn" in reason((128, 256), (128, 2), (128, 256), (1, 2),
                            dtypes=(jnp.bfloat16, jnp.float32, E4M3, jnp.float32))


def test_wrong_operands_raise_a_value_error_naming_the_kernel():
  qa, sa, qb, sb, _, _ = quantized(0, 128, 128, 256)
  with pytest.raises(ValueError, match="fp8_gemm .*disagree on K"):
    kernel_mgpu.fp8_gemm(qa, sa, qb[:, :128], sb)
  with pytest.raises(ValueError, match="fp8_grouped_gemm .*tile_groups"):
    kernel_mgpu.fp8_grouped_gemm(qa, sa, qb[None], sb[None], jnp.zeros((2,), jnp.int32))


def test_default_ring_is_as_deep_as_smem_allows():
  for block_n in kernel_mgpu.BLOCK_NS:
    for out_dtype in kernel_mgpu.OUT_DTYPES:
      stages = kernel_mgpu.default_stages(block_n, out_dtype)
      assert 4 <= stages <= 6
      assert kernel_mgpu.smem_bytes(block_n, stages, out_dtype) <= 227 * 1024
      if stages < 6:
        assert kernel_mgpu.smem_bytes(block_n, stages + 1, out_dtype) > 227 * 1024


V3_SHAPES = [(7168, 2048), (4096, 7168), (24576, 1536), (7168, 16384)]  # (N, K)


def dense_args(m, n, k):
  kb, nb = -(-k // 128), -(-n // 128)
  return S((m, k), E4M3), S((m, kb), jnp.float32), S((n, k), E4M3), S((nb, kb), jnp.float32)


@pytest.mark.parametrize("m", [128, 4096])
@pytest.mark.parametrize("n,k", V3_SHAPES)
def test_v3_shapes_lower_to_one_mosaic_gpu_kernel_for_cuda(m, n, k, lower_for_cuda):
  text = lower_for_cuda(lambda *a: kernel_mgpu.fp8_gemm(*a), *dense_args(m, n, k))
  assert text.count("custom_call @mosaic_gpu") == 1


@pytest.mark.parametrize("block_n,out_dtype,m,n,k", [
    (64, jnp.float32, 100, 4000, 7000),  # ragged shape: padded around the kernel
    (128, jnp.float16, 128, 7168, 2048),
])
def test_other_settings_lower_for_cuda(block_n, out_dtype, m, n, k, lower_for_cuda):
  gemm = lambda *a: kernel_mgpu.fp8_gemm(*a, block_n=block_n, out_dtype=out_dtype)
  assert lower_for_cuda(gemm, *dense_args(m, n, k)).count("custom_call @mosaic_gpu") == 1


@pytest.mark.parametrize("n,k", [(4096, 7168), (7168, 2048)])  # V3's expert GEMMs, as DeepGEMM's
def test_grouped_gemm_lowers_for_cuda_at_v3_expert_shapes(n, k, lower_for_cuda):
  experts, rows = 8, 8 * 512
  args = (S((rows, k), E4M3), S((rows, k // 128), jnp.float32), S((experts, n, k), E4M3),
          S((experts, n // 128, k // 128), jnp.float32), S((rows // 128,), jnp.int32))
  text = lower_for_cuda(lambda *a: kernel_mgpu.fp8_grouped_gemm(*a), *args)
  assert text.count("custom_call @mosaic_gpu") == 1


def _on_hopper() -> bool:
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "9.0")) == "9.0"


@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (sm_90a wgmma)")
@pytest.mark.parametrize("m", [128, 300])
@pytest.mark.parametrize("n,k", V3_SHAPES)
def test_v3_shapes_on_gpu_match_scaled_dot(m, n, k):
  qa, sa, qb, sb, qw, sw = quantized(m + n, m, n, k)
  want = reference(qa, sa, qw, sw, n)
  for block_n in kernel_mgpu.BLOCK_NS:
    out = kernel_mgpu.fp8_gemm(qa, sa, qb, sb, block_n=block_n)
    # Hopper accumulates a slice's FP8 products in ~14 bits (V3 §3.3.2), then bf16 rounding.
    assert fp8.relative_error(out, want) < 1e-4, (block_n, fp8.relative_error(out, want))


@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (sm_90a wgmma)")
def test_grouped_gemm_on_gpu_matches_each_experts_scaled_dot():
  sizes, n, k = [1000, 0, 3, 500, 129], 2048, 7168
  qa, sa, qb, sb, qw, sw = quantized(1, sum(sizes), n, k, n_experts=len(sizes))
  positions, tile_groups, padded = kernel_mgpu.contiguous_layout(jnp.asarray(sizes), sum(sizes))
  scatter = lambda x: jnp.zeros((padded, x.shape[1]), x.dtype).at[positions].set(x)
  out = kernel_mgpu.fp8_grouped_gemm(scatter(qa), scatter(sa), qb, sb, tile_groups)
  start = np.cumsum([0] + sizes)
  want = jnp.concatenate([reference(qa[a:b], sa[a:b], qw[e], sw[e], n)
                          for e, (a, b) in enumerate(zip(start[:-1], start[1:]))])
  assert fp8.relative_error(out[positions], want) < 1e-4
