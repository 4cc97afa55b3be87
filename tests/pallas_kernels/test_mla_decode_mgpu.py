"""The Mosaic GPU (Hopper) paged MLA decode kernel against the pure-JAX reference.

Three levels, from what any machine can check to what only an H100 can:
  * numerics in Mosaic GPU's CPU interpreter at small shapes (C 128, R 64, G 64): jax >= 0.11
    only, the 0.10 interpreter lacks transposed wgmma operands;
  * production shapes (C 512, R 64, G 64, bf16) lowered for CUDA without a GPU, which runs the
    whole Pallas -> Mosaic GPU lowering, its SMEM budget check included;
  * production shapes on a real GPU, skipped elsewhere.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mla_decode import kernel_mgpu
from pallas_kernels.mla_decode.reference import mla_decode_reference

SCALE = 0.3


def paged_inputs(seed, *, lengths, n_tokens, n_heads, width, rope=64, page=64, per_row=3,
                 dtype=jnp.bfloat16):
  """Random q and a shuffled page pool in which every slot no query may read is NaN.

  NaN fills the tail of each row's last page and the pool pages no row owns; the block table
  holds -1 or an out-of-range page id past each row's last valid page.
  """
  rng = np.random.default_rng(seed)
  batch = len(lengths)
  n_pool = batch * per_row + 2
  q = rng.standard_normal((batch, n_tokens, n_heads, width + rope), np.float32)
  c_pages = np.full((n_pool, page, width), np.nan, np.float32)
  r_pages = np.full((n_pool, page, rope), np.nan, np.float32)
  table = rng.permutation(n_pool)[:batch * per_row].reshape(batch, per_row)
  for b, length in enumerate(lengths):
    for j in range(-(-length // page)):
      used = min(page, length - j * page)
      c_pages[table[b, j], :used] = rng.standard_normal((used, width))
      r_pages[table[b, j], :used] = rng.standard_normal((used, rope))
    table[b, -(-length // page):] = -1 if b % 2 else n_pool + 5
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(c_pages), cast(r_pages), jnp.asarray(lengths, jnp.int32),
          jnp.asarray(table, jnp.int32))


def reference(q, c_pages, r_pages, lengths, table, causal, scale):
  # The reference gathers every table entry: point the unspecified ones at a real (NaN) page.
  table = jnp.where((table < 0) | (table >= c_pages.shape[0]), 0, table)
  return mla_decode_reference(q, c_pages, r_pages, lengths, table, softmax_scale=scale,
                              causal=causal)


def assert_matches_reference(inputs, out, lse, causal, scale=SCALE):
  want_out, want_lse = reference(*inputs, causal=causal, scale=scale)
  assert out.shape == want_out.shape and out.dtype == inputs[0].dtype
  assert lse.dtype == jnp.float32
  out, want_out = np.asarray(out, np.float32), np.asarray(want_out, np.float32)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, want_out, atol=2e-2, rtol=2e-2)
  np.testing.assert_allclose(lse, want_lse, atol=2e-3, rtol=1e-4)


needs_interpreter = pytest.mark.skipif(
    not kernel_mgpu.INTERPRET_SUPPORTED,
    reason=f"Mosaic GPU interpreter cannot run this kernel on jax {jax.__version__} (< 0.11)")

# (lengths, T, N, C, splits, causal, dtype); G = 64 and 3 pages per row: full rows are 192.
CASES = [
    ([1, 192, 70], 1, 4, 128, 1, True, jnp.bfloat16),  # length 1, full row, 6-slot last page
    ([2, 192, 65], 1, 16, 128, 3, True, jnp.bfloat16),  # short rows leave splits empty
    ([66, 192, 129], 2, 48, 128, 2, True, jnp.bfloat16),  # MTP pair: 96 rows, 2 head blocks
    ([3, 150, 64], 2, 8, 256, 2, False, jnp.float16),  # non-causal pair, C 256
]


@needs_interpreter
@pytest.mark.parametrize("lengths,n_tokens,n_heads,width,splits,causal,dtype", CASES)
def test_interpreted_decode_matches_reference_with_nan_in_unused_slots(
    lengths, n_tokens, n_heads, width, splits, causal, dtype):
  inputs = paged_inputs(sum(lengths), lengths=lengths, n_tokens=n_tokens, n_heads=n_heads,
                        width=width, dtype=dtype)
  out, lse = kernel_mgpu.mla_decode(*inputs, softmax_scale=SCALE, causal=causal,
                                    num_splits=splits, interpret=True)
  assert_matches_reference(inputs, out, lse, causal)


@pytest.mark.skipif(kernel_mgpu.INTERPRET_SUPPORTED, reason="the interpreter runs the kernel")
def test_interpret_mode_on_old_jax_fails_with_an_explanation():
  inputs = paged_inputs(0, lengths=[3], n_tokens=1, n_heads=4, width=128)
  with pytest.raises(ValueError, match="needs jax >= 0.11"):
    kernel_mgpu.mla_decode(*inputs, softmax_scale=SCALE, interpret=True)


def test_unsupported_reason_accepts_deepseek_shapes_and_explains_the_rest():
  reason = kernel_mgpu.unsupported_reason
  assert reason((8, 2, 128, 576), (100, 64, 512), (100, 64, 64), (8, 16)) is None
  assert reason((8, 1, 16, 320), (100, 64, 256), (100, 64, 64), (8, 16), jnp.float16) is None
  assert "bf16 or f16" in reason((8, 1, 16, 576), (100, 64, 512), (100, 64, 64), (8, 16),
                                 jnp.float32)
  assert "multiple of 128" in reason((8, 1, 16, 640), (100, 64, 576), (100, 64, 64), (8, 16))
  assert "multiples of 64" in reason((8, 1, 16, 576), (100, 32, 512), (100, 32, 64), (8, 16))
  assert "SMEM" in reason((8, 1, 16, 576), (100, 128, 512), (100, 128, 64), (8, 16))
  assert "disagree" in reason((8, 1, 16, 560), (100, 64, 512), (100, 64, 64), (8, 16))
  assert "batch" in reason((8, 1, 16, 576), (100, 64, 512), (100, 64, 64), (4, 16))
  assert "exceed a page" in reason((8, 65, 16, 576), (100, 64, 512), (100, 64, 64), (8, 16))


def test_default_num_splits_fills_the_sms_but_never_exceeds_the_pages():
  assert kernel_mgpu.default_num_splits(128, 2, 128) == 1
  assert kernel_mgpu.default_num_splits(4, 1, 128) == 33
  assert kernel_mgpu.default_num_splits(2, 1, 8) == 8


def production_args(batch, n_tokens, n_heads, per_row=33):
  pool = batch * per_row + 5  # 2112-slot rows; pool and table need not be powers of two
  return (jax.ShapeDtypeStruct((batch, n_tokens, n_heads, 576), jnp.bfloat16),
          jax.ShapeDtypeStruct((pool, 64, 512), jnp.bfloat16),
          jax.ShapeDtypeStruct((pool, 64, 64), jnp.bfloat16),
          jax.ShapeDtypeStruct((batch,), jnp.int32),
          jax.ShapeDtypeStruct((batch, per_row), jnp.int32))


@pytest.mark.parametrize("n_tokens,n_heads,splits", [(1, 16, None), (2, 64, None),
                                                     (1, 128, 1), (2, 128, 4)])
def test_production_shapes_lower_to_one_mosaic_gpu_kernel_for_cuda(n_tokens, n_heads, splits,
                                                                  lower_for_cuda):
  decode = lambda *a: kernel_mgpu.mla_decode(*a, softmax_scale=576 ** -0.5, num_splits=splits)
  text = lower_for_cuda(decode, *production_args(4, n_tokens, n_heads))
  assert text.count("custom_call @mosaic_gpu") == 1  # mosaic_gpu_v2 on jax 0.10 and 0.11


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a Hopper GPU")
@pytest.mark.parametrize("lengths,n_tokens,n_heads,splits", [
    ([1, 64, 65, 2112], 1, 16, None),
    ([100, 2112, 1000, 129], 2, 128, None),
    ([2112, 5, 640, 2000], 2, 64, 1),
])
def test_production_shapes_on_gpu_match_reference_with_nan_in_unused_slots(
    lengths, n_tokens, n_heads, splits):
  inputs = paged_inputs(7, lengths=lengths, n_tokens=n_tokens, n_heads=n_heads, width=512,
                        per_row=33)
  out, lse = kernel_mgpu.mla_decode(*inputs, softmax_scale=576 ** -0.5, num_splits=splits)
  assert_matches_reference(inputs, out, lse, causal=True, scale=576 ** -0.5)
