"""The GPU (Triton-lowered) paged MLA decode kernel against the pure-JAX reference.

Numerics run in Pallas interpret mode on CPU with small shapes; production shapes (C 512, R 64,
G 64, bf16) are lowered for CUDA without a GPU to prove the Triton lowering accepts the kernel.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mla_decode import kernel_gpu
from pallas_kernels.mla_decode.reference import mla_decode_reference

SCALE = 0.3


def make_paged_inputs(seed, *, lengths, n_tokens, n_heads, width=64, rope=16, page=16,
                      pages_per_row=4, dtype=jnp.float32):
  """Random q and a shuffled page pool; every slot a row must not read is NaN.

  NaN fills the tail of each row's last page, the pool pages no row owns, and the block table
  holds -1 (or an out-of-range id) past each row's last valid page.
  """
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths, np.int32)
  batch = len(lengths)
  n_pool = batch * pages_per_row + 3
  q = rng.standard_normal((batch, n_tokens, n_heads, width + rope), np.float32)
  c_pages = rng.standard_normal((n_pool, page, width), np.float32)
  r_pages = rng.standard_normal((n_pool, page, rope), np.float32)
  table = rng.permutation(n_pool)[:batch * pages_per_row].reshape(batch, pages_per_row)
  owned = np.zeros(n_pool, bool)
  for b, length in enumerate(lengths):
    n_valid = -(-length // page)
    last = table[b, n_valid - 1]
    c_pages[last, length - (n_valid - 1) * page:] = np.nan
    r_pages[last, length - (n_valid - 1) * page:] = np.nan
    owned[table[b, :n_valid]] = True
    table[b, n_valid:] = -1 if b % 2 == 0 else n_pool + 7
  c_pages[~owned] = np.nan
  r_pages[~owned] = np.nan
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(c_pages), cast(r_pages), jnp.asarray(lengths),
          jnp.asarray(table.astype(np.int32)))


def reference(q, c_pages, r_pages, lengths, table, causal=True):
  # The reference gathers every table entry: point the unspecified ones at a real (NaN) page.
  table = jnp.where((table < 0) | (table >= c_pages.shape[0]), 0, table)
  return mla_decode_reference(q, c_pages, r_pages, lengths, table, softmax_scale=SCALE,
                              causal=causal)


# (lengths, T, N, splits, block_h, causal, dtype); G = 16, M = 4, so full rows have 64 slots.
CASES = [
    ([1, 64, 19, 33], 1, 4, 1, None, True, jnp.float32),  # length 1 and full rows, one split
    ([2, 64, 17, 40], 1, 4, 3, None, True, jnp.float32),  # short rows leave splits empty
    ([2, 64, 17, 33], 2, 16, 2, 16, True, jnp.float32),  # MTP pair: causal, 2 head blocks
    ([3, 48, 31, 64], 2, 4, 4, None, False, jnp.float32),  # non-causal pair, one split per page
    ([2, 64, 17, 50], 2, 8, 2, None, True, jnp.bfloat16),
]


@pytest.mark.parametrize("lengths,n_tokens,n_heads,splits,block_h,causal,dtype", CASES)
def test_paged_decode_matches_reference_with_nan_in_unused_slots(lengths, n_tokens, n_heads,
                                                                  splits, block_h, causal,
                                                                  dtype):
  inputs = make_paged_inputs(len(CASES) + splits, lengths=lengths, n_tokens=n_tokens,
                             n_heads=n_heads, dtype=dtype)
  out, lse = kernel_gpu.mla_decode(*inputs, softmax_scale=SCALE, causal=causal,
                                   num_splits=splits, block_h=block_h, interpret=True)
  want_out, want_lse = reference(*inputs, causal=causal)
  assert out.shape == want_out.shape and out.dtype == dtype and lse.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
  tol = dict(atol=2e-5, rtol=2e-5) if dtype == jnp.float32 else dict(atol=2e-2, rtol=2e-2)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32),
                             **tol)
  np.testing.assert_allclose(lse, want_lse, atol=1e-4 if dtype == jnp.float32 else 1e-3,
                             rtol=1e-5)


def test_default_num_splits_fills_the_sms_but_never_exceeds_the_pages():
  assert kernel_gpu.default_num_splits(128, 4, 128) == 1  # the batch already fills the GPU
  assert kernel_gpu.default_num_splits(2, 1, 128) == 66  # 2 programs -> 132 with splits
  assert kernel_gpu.default_num_splits(2, 1, 8) == 8  # no more splits than pages
  assert kernel_gpu.default_num_splits(1, 1, 1) == 1


def test_unsupported_reason_accepts_deepseek_shapes_and_explains_the_rest():
  assert kernel_gpu.unsupported_reason((8, 2, 128, 576), (100, 64, 512), (100, 64, 64),
                                       (8, 16)) is None
  assert "power-of-two" in kernel_gpu.unsupported_reason((8, 1, 16, 576), (100, 48, 512),
                                                         (100, 48, 64), (8, 16))
  assert "disagree" in kernel_gpu.unsupported_reason((8, 1, 16, 560), (100, 64, 512),
                                                     (100, 64, 64), (8, 16))
  assert "batch" in kernel_gpu.unsupported_reason((8, 1, 16, 576), (100, 64, 512),
                                                  (100, 64, 64), (4, 16))


@pytest.mark.parametrize("batch,n_tokens,n_heads", [(2, 1, 16), (6, 2, 16), (4, 1, 128),
                                                    (8, 2, 128)])
def test_production_shapes_lower_to_a_triton_kernel_for_cuda(batch, n_tokens, n_heads,
                                                            lower_for_cuda):
  per_row = 33  # 2112-slot rows: pool, table and batch need not be powers of two
  pool = batch * per_row + 5
  args = (jax.ShapeDtypeStruct((batch, n_tokens, n_heads, 576), jnp.bfloat16),
          jax.ShapeDtypeStruct((pool, 64, 512), jnp.bfloat16),
          jax.ShapeDtypeStruct((pool, 64, 64), jnp.bfloat16),
          jax.ShapeDtypeStruct((batch,), jnp.int32),
          jax.ShapeDtypeStruct((batch, per_row), jnp.int32))
  decode = lambda *a: kernel_gpu.mla_decode(*a, softmax_scale=576 ** -0.5)
  text = lower_for_cuda(decode, *args)
  assert text.count("xla.gpu.triton") == 1
