"""The TPU (Mosaic) paged MLA decode kernel against the pure-JAX reference.

Interpret mode on CPU with small shapes; one case in TPU-faithful interpret mode
(pltpu.InterpretParams: out-of-bounds DMAs raise, scratch starts as NaN); and an ahead-of-time
Mosaic compile of the real kernel at DeepSeek-V3 shapes (skipped without libtpu).
"""

import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mla_decode.kernel_tpu import mla_decode, unsupported_reason
from pallas_kernels.mla_decode.reference import mla_decode_reference

TOLERANCE = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
LSE_TOLERANCE = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-3, rtol=2e-3)}


def make_paged_cache(seed, *, batch, n_queries, n_heads, lat, rope, page_size, n_pages,
                     dtype, lengths=None, unused_entry=-1):
  """A random paged cache whose every unread value is NaN.

  Rows own disjoint pages of a shuffled pool (twice the pages needed); pages no row owns and the
  slots past each row's length are NaN; block-table entries past a row's last page hold
  ``unused_entry`` (an invalid page id). Lengths are random, with 1 (T for T=2) and full forced.
  """
  rng = np.random.default_rng(seed)
  full = n_pages * page_size
  if lengths is None:
    lengths = rng.integers(n_queries, full + 1, size=batch)
    lengths[0] = n_queries
    lengths[-1] = full
  lengths = np.asarray(lengths, np.int32)
  pool = 2 * batch * n_pages
  owner = rng.permutation(pool)[:batch * n_pages].reshape(batch, n_pages)
  c_pages = np.full((pool, page_size, lat), np.nan, np.float32)
  r_pages = np.full((pool, page_size, rope), np.nan, np.float32)
  table = np.full((batch, n_pages), unused_entry, np.int64)
  for b, length in enumerate(lengths):
    used = -(-int(length) // page_size)
    table[b, :used] = owner[b, :used]
    for j in range(length):
      page, slot = owner[b, j // page_size], j % page_size
      c_pages[page, slot] = rng.standard_normal(lat)
      r_pages[page, slot] = rng.standard_normal(rope)
  q = rng.standard_normal((batch, n_queries, n_heads, lat + rope))
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(c_pages), cast(r_pages), jnp.asarray(lengths),
          jnp.asarray(table.astype(np.int32)))


@functools.partial(jax.jit, static_argnames=("softmax_scale", "causal"))
def reference(q, c_pages, r_pages, lengths, table, *, softmax_scale, causal):
  # The reference gathers every table entry; point the unspecified ones at page 0 (it masks them).
  pages = -(-lengths // c_pages.shape[1])
  safe = jnp.where(jnp.arange(table.shape[1])[None] < pages[:, None], table, 0)
  return mla_decode_reference(q, c_pages, r_pages, lengths, safe, softmax_scale=softmax_scale,
                              causal=causal)


def assert_matches_reference(args, dtype, *, causal=True, **kwargs):
  scale = args[0].shape[-1] ** -0.5
  out, lse = mla_decode(*args, softmax_scale=scale, causal=causal, **kwargs)
  want_out, want_lse = reference(*args, softmax_scale=scale, causal=causal)
  assert out.shape == want_out.shape and out.dtype == args[0].dtype
  assert lse.shape == want_lse.shape and lse.dtype == jnp.float32
  assert np.isfinite(np.asarray(out, np.float32)).all()
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32),
                             **TOLERANCE[dtype])
  np.testing.assert_allclose(lse, want_lse, **LSE_TOLERANCE[dtype])
  return out, lse


# (seed, B, T, N, C, R, G, M, num_splits, block_h, dtype): ~1.5 s each in interpret mode.
CASES = [
    (0, 3, 1, 4, 128, 64, 16, 5, 1, None, jnp.float32),
    (1, 2, 2, 4, 128, 32, 16, 8, 3, None, jnp.float32),
    (2, 4, 1, 16, 256, 64, 64, 2, 1, 8, jnp.bfloat16),
    (3, 3, 2, 16, 128, 64, 8, 7, 3, 4, jnp.bfloat16),
    (4, 2, 2, 4, 128, 64, 64, 3, 3, None, jnp.bfloat16),
    (5, 1, 1, 16, 256, 32, 8, 8, 3, 8, jnp.float32),
]


@pytest.mark.parametrize("seed,batch,n_queries,n_heads,lat,rope,page_size,n_pages,splits,"
                         "block_h,dtype", CASES)
def test_paged_decode_matches_reference_with_nan_in_unused_slots_and_pages(
    seed, batch, n_queries, n_heads, lat, rope, page_size, n_pages, splits, block_h, dtype):
  args = make_paged_cache(seed, batch=batch, n_queries=n_queries, n_heads=n_heads, lat=lat,
                          rope=rope, page_size=page_size, n_pages=n_pages, dtype=dtype,
                          unused_entry=-1 if seed % 2 else 2**30)
  assert_matches_reference(args, dtype, num_splits=splits, block_h=block_h, interpret=True)


def test_splits_without_visible_slots_do_not_change_the_result():
  # Pages of 16 slots, 3 splits of 3 pages. Row lengths 2 and 17 leave splits 1 and 2 empty; for
  # the row of 49, split 1 opens on page 3 whose only slot (48) is the newest token, which the
  # first speculative query must not see: that query has no visible slot yet in its first step.
  args = make_paged_cache(7, batch=3, n_queries=2, n_heads=4, lat=128, rope=64, page_size=16,
                          n_pages=9, dtype=jnp.float32, lengths=[2, 17, 49])
  three, _ = assert_matches_reference(args, jnp.float32, num_splits=3, interpret=True)
  one, _ = mla_decode(*args, softmax_scale=args[0].shape[-1] ** -0.5, interpret=True)
  np.testing.assert_allclose(three, one, atol=1e-6, rtol=1e-6)


def test_speculative_pair_without_causal_mask_matches_reference():
  args = make_paged_cache(8, batch=2, n_queries=2, n_heads=4, lat=128, rope=64, page_size=16,
                          n_pages=3, dtype=jnp.float32)
  assert_matches_reference(args, jnp.float32, causal=False, num_splits=2, interpret=True)


def test_tpu_faithful_interpret_never_reads_unspecified_block_table_entries():
  # InterpretParams raises on an out-of-bounds DMA (entries past a row's pages are 2**30) and
  # fills VMEM scratch with NaN, so a missed initialisation or an unclamped page index fails.
  args = make_paged_cache(9, batch=2, n_queries=2, n_heads=4, lat=128, rope=64, page_size=16,
                          n_pages=4, dtype=jnp.float32, lengths=[5, 40], unused_entry=2**30)
  assert_matches_reference(args, jnp.float32, num_splits=2,
                           interpret=pltpu.InterpretParams(out_of_bounds_reads="raise"))


def test_unsupported_reason_accepts_production_shapes_and_names_the_rest():
  assert unsupported_reason((8, 2, 128, 576), (4096, 64, 512), (4096, 64, 64), (8, 64)) is None
  assert "multiple of 8" in unsupported_reason((8, 1, 16, 576), (64, 60, 512), (64, 60, 64),
                                               (8, 4))
  assert "C + R" in unsupported_reason((8, 1, 16, 512), (64, 64, 512), (64, 64, 64), (8, 4))
  assert "128" in unsupported_reason((8, 1, 16, 164), (64, 64, 100), (64, 64, 64), (8, 4))
  assert "disagree" in unsupported_reason((8, 1, 16, 576), (64, 64, 512), (32, 64, 64), (8, 4))
  assert "batch" in unsupported_reason((8, 1, 16, 576), (64, 64, 512), (64, 64, 64), (4, 4))


def test_block_h_must_tile_the_heads():
  args = make_paged_cache(10, batch=1, n_queries=1, n_heads=16, lat=128, rope=64, page_size=8,
                          n_pages=1, dtype=jnp.float32)
  with pytest.raises(ValueError, match="divide"):
    mla_decode(*args, softmax_scale=0.1, block_h=5, interpret=True)
  with pytest.raises(ValueError, match="multiple of 8"):
    mla_decode(*args, softmax_scale=0.1, block_h=4, interpret=True)


@pytest.mark.parametrize("n_queries,n_heads,splits,block_h", [(1, 16, 1, None), (2, 128, 1, None),
                                                              (2, 128, 4, 64)])
def test_kernel_compiles_to_mosaic_for_tpu_at_deepseek_v3_shapes(
    compile_for_tpu, n_queries, n_heads, splits, block_h):
  batch, lat, rope, page_size, n_pages, pool = 8, 512, 64, 64, 64, 1024
  bf16 = jnp.bfloat16
  args = [jax.ShapeDtypeStruct((batch, n_queries, n_heads, lat + rope), bf16),
          jax.ShapeDtypeStruct((pool, page_size, lat), bf16),
          jax.ShapeDtypeStruct((pool, page_size, rope), bf16),
          jax.ShapeDtypeStruct((batch,), jnp.int32),
          jax.ShapeDtypeStruct((batch, n_pages), jnp.int32)]
  assert unsupported_reason(*(a.shape for a in args[:3]), args[4].shape) is None
  compiled = compile_for_tpu(
      lambda *a: mla_decode(*a, softmax_scale=0.135, num_splits=splits, block_h=block_h), *args)
  assert "tpu_custom_call" in compiled.as_text()
