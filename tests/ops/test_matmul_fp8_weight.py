"""``weight_matmul`` on a weight held in FP8 (``quant.fp8.Fp8Weight``, as kept from a released
V3/R1 checkpoint): under "bf16" it is the product with the dequantised weight; under
"fp8_blockwise" it is the block-scaled GEMM of the stored blocks, never re-quantised."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.ops import matmul
from deepseek_jax.ops.grouped_matmul import grouped_matmul
from deepseek_jax.quant import fp8
from deepseek_jax.quant.fp8 import Fp8Weight

# (equation, activation shape, weight shape, trailing free axes of the weight)
CASES = [
    ("BTD,DF->BTF", (2, 5, 200), (200, 130), 1),  # no axis a multiple of 128: edge blocks
    ("BTQ,QNH->BTNH", (2, 3, 256), (256, 3, 96), 2),  # W_UQ-like: heads flatten into N
    ("BTNV,NVD->BTD", (2, 3, 4, 80), (4, 80, 128), 1),  # W_O: two contracted axes, K = 320
]


def _weight(shape, n_out, key=1, lead=0, block=128):
  w = 0.05 * jax.random.normal(jax.random.key(key), shape)
  w = w.at[(0,) * len(shape)].set(0.7)  # one outlier: blocks with different scales
  return Fp8Weight.quantize(w, n_out=n_out, lead=lead, block=block, dtype=jnp.float32)


def _stored_block_gemm(x2, w: Fp8Weight):
  """The block-scaled GEMM spelled out on the stored blocks: x2 [M, K] in 1 x bk tiles, the
  weight's [K, N] view with each block's scale repeated over its columns."""
  bk, bn = w.block
  k, n = w.matrix().shape
  qa, sa = fp8.quantize_tiles(x2, bk)
  qw = jnp.zeros((qa.shape[1], n), w.q.dtype).at[:k].set(w.matrix())
  sw = jnp.repeat(w.scale, bn, axis=1)[:, :n]
  return fp8.scaled_dot(qa, sa, qw, sw, bk)


@pytest.mark.parametrize("eqn, x_shape, w_shape, n_out", CASES)
def test_bf16_format_multiplies_the_dequantised_weight(eqn, x_shape, w_shape, n_out):
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = _weight(w_shape, n_out)
  for dtype in (jnp.float32, jnp.bfloat16):
    got = matmul.weight_matmul(eqn, x, nnx.Param(w), dtype=dtype)
    want = matmul.weight_matmul(eqn, x, w.dequantize(dtype), dtype=dtype)
    assert got.dtype == dtype and jnp.array_equal(got, want)
  exact = jnp.einsum(eqn, x, w.dequantize(jnp.float32))
  np.testing.assert_allclose(matmul.weight_matmul(eqn, x, w, dtype=jnp.float32), exact,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eqn, x_shape, w_shape, n_out", CASES)
def test_fp8_blockwise_is_the_scaled_gemm_of_the_stored_blocks(eqn, x_shape, w_shape, n_out):
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = _weight(w_shape, n_out)
  got = matmul.weight_matmul(eqn, x, nnx.Param(w), dtype=jnp.float32, fmt="fp8_blockwise")
  contracted = len(w_shape) - n_out
  m, k = int(np.prod(x_shape[:-contracted])), int(np.prod(x_shape[-contracted:]))
  want = _stored_block_gemm(x.reshape(m, k), w).reshape(got.shape)
  assert got.shape == jnp.einsum(eqn, x, w.dequantize()).shape and got.dtype == jnp.float32
  assert jnp.array_equal(got, want)
  got16 = matmul.weight_matmul(eqn, x, w, dtype=jnp.bfloat16, fmt="fp8_blockwise")
  want16 = _stored_block_gemm(x.astype(jnp.bfloat16).reshape(m, k), w)
  assert got16.dtype == jnp.bfloat16
  assert jnp.array_equal(got16, want16.astype(jnp.bfloat16).reshape(got.shape))
  # The same GEMM as re-quantising the dequantised weight (the blocks come back as they were,
  # up to the f32 rounding of their scales), and close to the exact product.
  requantised = fp8.fp8_einsum(eqn, x, w.dequantize(jnp.float32))
  assert fp8.relative_error(got, requantised) < 1e-6
  assert fp8.relative_error(got, jnp.einsum(eqn, x, w.dequantize())) < 2e-3


def test_fp8_blockwise_reads_the_blocks_without_requantising_them(monkeypatch):
  """A weight whose blocks were not made by amax / 448 (power-of-two scales, as UE8M0
  checkpoints hold) is multiplied with its own scales: re-quantising it would change them."""
  w = _weight((256, 128), 1)
  w = Fp8Weight(w.q, 2.0 ** jnp.ceil(jnp.log2(w.scale)), 1, w.block, jnp.float32)
  x = jax.random.normal(jax.random.key(0), (7, 256))
  monkeypatch.setattr(matmul, "fp8_einsum", None)  # must not be reached
  got = matmul.weight_matmul("TD,DF->TF", x, w, dtype=jnp.float32, fmt="fp8_blockwise")
  assert jnp.array_equal(got, _stored_block_gemm(x, w))


def test_tensorwise_format_runs_the_dequantised_weight_per_tensor():
  x = jax.random.normal(jax.random.key(0), (3, 200))
  w = _weight((200, 130), 1)
  got = matmul.weight_matmul("TD,DF->TF", x, w, dtype=jnp.float32, fmt="fp8_tensorwise")
  assert jnp.array_equal(got, fp8.fp8_einsum("TD,DF->TF", x, w.dequantize(jnp.float32),
                                             "tensorwise"))


def _grouped_case():
  sizes = jnp.array([5, 0, 9, 2], jnp.int32)
  x = jax.random.normal(jax.random.key(0), (int(sizes.sum()), 160))
  w = _weight((4, 160, 136), 1, lead=1)
  product = lambda a, b, s: grouped_matmul(a, b, s, impl="tiled")
  return x, w, sizes, product


def test_grouped_product_bf16_is_the_product_with_the_dequantised_experts():
  x, w, sizes, product = _grouped_case()
  kw = dict(dtype=jnp.float32, product=product, product_args=(sizes,))
  got = matmul.weight_matmul("MD,EDF->MF", x, nnx.Param(w), **kw)
  assert jnp.array_equal(got, matmul.weight_matmul("MD,EDF->MF", x, w.dequantize(), **kw))


def test_grouped_product_fp8_uses_the_stored_blocks_of_each_expert():
  x, w, sizes, product = _grouped_case()
  got = matmul.weight_matmul("MD,EDF->MF", x, w, dtype=jnp.float32, product=product,
                             product_args=(sizes,), fmt="fp8_blockwise")
  ends = np.cumsum(np.asarray(sizes))
  for e, (start, end) in enumerate(zip(ends - np.asarray(sizes), ends)):
    if end > start:  # each expert's rows: the block-scaled GEMM with that expert's blocks
      expert = Fp8Weight(w.q[e], w.scale[e], 1, w.block, w.dtype)
      want = _stored_block_gemm(x[start:end], expert)
      np.testing.assert_allclose(got[start:end], want, rtol=1e-5, atol=1e-6)
  requantised = fp8.fp8_product(product, x, w.dequantize(), product_args=(sizes,))
  assert fp8.relative_error(got, requantised) < 1e-6


def test_fp8_weight_layout_pytree_and_value():
  w = _weight((3, 200, 4, 40), 2, lead=1)  # [lead, K, N1, N2]: K = 200, N = 160
  assert w.shape == (3, 200, 4, 40) and w.lead == 1 and w.scale.shape == (3, 2, 2)
  assert w.matrix().shape == (3, 200, 160) and w.q.dtype == jnp.float8_e4m3fn
  assert w.nbytes == 3 * 200 * 160 + 4 * 12
  param = nnx.Param(w)
  assert param.shape == w.shape and jnp.array_equal(param[...], w.dequantize())
  assert jnp.array_equal(w[1], w.dequantize()[1])
  # Slicing the leaves along the lead axis (lax.scan over a stack) gives each matrix's weight.
  _, rows = jax.lax.scan(lambda c, m: (c, m.dequantize()), 0, w)
  assert jnp.array_equal(rows, w.dequantize())
  leaves, tree = jax.tree.flatten(w)
  assert len(leaves) == 2 and jax.tree.unflatten(tree, leaves).n_out == 2
  assert jax.jit(lambda v: v.dequantize(jnp.bfloat16))(w).dtype == jnp.bfloat16


def test_misuse_is_refused():
  w = _weight((64, 4, 16), 2)
  with pytest.raises(ValueError, match="contracting the weight's 1 leading axes"):
    matmul.weight_matmul("BTNH,CNH->BTNC", jnp.ones((1, 2, 4, 16)), w, dtype=jnp.float32,
                         fmt="fp8_blockwise")  # MLA's absorbed product: run it in bf16
  out = matmul.weight_matmul("BTNH,CNH->BTNC", jnp.ones((1, 2, 4, 16)), w, dtype=jnp.float32)
  assert out.shape == (1, 2, 4, 64)
  with pytest.raises(ValueError, match="float8_e4m3fn"):
    Fp8Weight(jnp.ones((64, 64)), jnp.ones((1, 1)))
  with pytest.raises(ValueError, match=r"need scales \(1, 2\)"):
    Fp8Weight(w.q.reshape(64, 64), jnp.ones((1, 1)), block=(64, 32))
