"""Every weight matmul of the model goes through ``ops.matmul.weight_matmul``: recording what
reaches the chokepoint while the model traces must account for every weight matrix."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.transformer import abstract_model
from deepseek_jax.ops import matmul
from deepseek_jax.train.loss import loss_fn


def _weight_shapes(model) -> collections.Counter:
  """Per-layer shapes of every Param that a matmul multiplies (norm scales are elementwise;
  the embedding is a lookup unless it is the tied head)."""
  shapes = collections.Counter()
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = path[-1]
    if name == "scale" or (name == "embedding" and not model.config.tie_embeddings):
      continue
    shape = variable.shape
    stacked = path[0] in ("dense_layers", "moe_layers")
    shapes[shape[1:] if stacked else shape] += 1
  return shapes


@pytest.mark.parametrize("overrides", [
    dict(),  # MLA + query compression, MoE with shared experts, MTP, untied head
    dict(q_lora_rank=None, tie_embeddings=True, n_mtp_modules=0),
    dict(attention_kind="gqa", n_kv_heads=2, n_shared_experts=0),
], ids=["v3-like", "tied-no-q-lora", "gqa"])
def test_every_weight_matrix_reaches_the_chokepoint(monkeypatch, overrides):
  cfg = ModelConfig.preset("tiny", **overrides)
  seen = collections.Counter()
  product = matmul._product

  def recording(eqn, x, w, *rest):
    seen[w.shape] += 1
    return product(eqn, x, w, *rest)

  monkeypatch.setattr(matmul, "_product", recording)
  model = abstract_model(cfg)
  batch = {"inputs": jnp.zeros((2, 16), jnp.int32), "targets": jnp.zeros((2, 16), jnp.int32)}
  graphdef, state = nnx.split(model)
  jax.eval_shape(lambda s: loss_fn(nnx.merge(graphdef, s), batch), state)
  # Each stack's body is traced once; the tiled expert FFN reaches it with [E, D, F] weights.
  want = _weight_shapes(model)
  assert want, "no weights found"
  missing = want - seen
  assert not missing, f"weights that bypass weight_matmul: {dict(missing)}"


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(q_lora_rank=None, tie_embeddings=True, n_mtp_modules=0),
    dict(attention_kind="gqa", n_kv_heads=2, n_shared_experts=0),
], ids=["v3-like", "tied-no-q-lora", "gqa"])
def test_matmul_format_reaches_every_weight_but_those_v3_keeps_in_high_precision(
    monkeypatch, overrides):
  """matmul_format=fp8_blockwise: every projection, dense FFN, shared and routed expert (the
  grouped product) and the MTP projection run in FP8; the embedding / tied head, the output
  head and the MoE router do not (V3 §3.3.2)."""
  # vocab 160: no weight shares the head's shape (the dense FFN is [64, 128])
  cfg = ModelConfig.preset("tiny", matmul_format="fp8_blockwise", vocab_size=160, **overrides)
  fp8_seen, plain_seen = collections.Counter(), collections.Counter()

  def spy(fn, seen):
    def recording(*args, **kwargs):
      seen[args[2].shape] += 1  # (eqn or product, x, w, ...)
      return fn(*args, **kwargs)
    return recording

  monkeypatch.setattr(matmul, "fp8_einsum", spy(matmul.fp8_einsum, fp8_seen))
  monkeypatch.setattr(matmul, "fp8_product", spy(matmul.fp8_product, fp8_seen))
  monkeypatch.setattr(matmul, "_product", spy(matmul._product, plain_seen))
  model = abstract_model(cfg)
  batch = {"inputs": jnp.zeros((2, 16), jnp.int32), "targets": jnp.zeros((2, 16), jnp.int32)}
  graphdef, state = nnx.split(model)
  jax.eval_shape(lambda s: loss_fn(nnx.merge(graphdef, s), batch), state)
  d, v, e = cfg.d_model, cfg.vocab_size, cfg.n_routed_experts
  kept = {(d, e), (v, d) if cfg.tie_embeddings else (d, v)}  # router, output head
  assert set(plain_seen) == kept
  assert set(fp8_seen) == set(_weight_shapes(model)) - kept


def test_weight_matmul_casts_both_operands_to_the_compute_dtype():
  x = jnp.ones((2, 3), jnp.float32)
  w = nnx.Param(jnp.ones((3, 4), jnp.float32))
  out = matmul.weight_matmul("TD,DF->TF", x, w, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  out32 = matmul.weight_matmul("TD,DF->TF", x.astype(jnp.bfloat16), w, dtype=jnp.bfloat16,
                               preferred_element_type=jnp.float32)
  assert out32.dtype == jnp.float32 and float(out32[0, 0]) == 3.0


@pytest.mark.parametrize("eqn, x_shape, w_shape", [
    ("BTD,DNH->BTNH", (2, 8, 64), (64, 4, 48)),  # W_UQ-like: the head axes flatten to N
    ("BTNV,NVD->BTD", (2, 8, 4, 40), (4, 40, 96)),  # W_O: two contracted axes, K = 160
    ("BTD,DF->BTF", (3, 5, 200), (200, 130)),  # no axis a multiple of 128
])
def test_fp8_formats_are_the_quant_gemm_on_the_weights_matrix_form(eqn, x_shape, w_shape):
  from deepseek_jax.quant import fp8
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = 0.05 * jax.random.normal(jax.random.key(1), w_shape)
  exact = matmul.weight_matmul(eqn, x, w, dtype=jnp.float32)
  for fmt in ("fp8_blockwise", "fp8_tensorwise"):
    out, vjp = jax.vjp(lambda a, b: matmul.weight_matmul(eqn, a, b, dtype=jnp.float32, fmt=fmt),
                       x, w)
    assert out.shape == exact.shape and out.dtype == jnp.float32
    assert fp8.relative_error(out, exact) < 2e-3, fmt
    dx, dw = vjp(jnp.ones_like(out))
    assert dx.shape == x.shape and dw.shape == w.shape
  # The blockwise product is fp8_matmul of the flattened [M, K] x [K, N] operands.
  m = 1
  for size in x_shape[:-1 if eqn.startswith("BTD") else -2]:
    m *= size
  k = w_shape[0] if eqn.startswith("BTD") else w_shape[0] * w_shape[1]
  flat = fp8.fp8_matmul(x.reshape(m, k), w.reshape(k, -1))
  got = matmul.weight_matmul(eqn, x, w, dtype=jnp.float32, fmt="fp8_blockwise")
  assert jnp.array_equal(got.reshape(m, -1), flat)
  with pytest.raises(ValueError, match="matmul format must be one of"):
    matmul.weight_matmul(eqn, x, w, dtype=jnp.float32, fmt="fp4")
  with pytest.raises(ValueError, match="disjoint free axes"):
    fp8.fp8_einsum("NBD,EDF->NBF", jnp.ones((2, 3, 4)), jnp.ones((5, 4, 6)))


def test_the_mosaic_gpu_kernel_plugs_into_the_dense_fp8_gemms(monkeypatch):
  """MatmulFormat(kernel="mosaic_gpu") runs Fprop and Dgrad on pallas_kernels.fp8_gemm (here in
  Mosaic GPU's CPU interpreter) and gives the XLA path's numbers; Wgrad stays XLA's."""
  from pallas_kernels.fp8_gemm import kernel_mgpu
  if not kernel_mgpu.INTERPRET_SUPPORTED:
    pytest.skip(f"jax {jax.__version__} has no Mosaic GPU interpreter")
  x = jax.random.normal(jax.random.key(0), (2, 100, 300))  # M 200, K 300, N 136: all padded
  w = 0.05 * jax.random.normal(jax.random.key(1), (300, 136))
  g = jax.random.normal(jax.random.key(2), (2, 100, 136))
  calls, kernel_gemm = [], kernel_mgpu.fp8_gemm
  monkeypatch.setattr(kernel_mgpu, "fp8_gemm",
                      lambda *a, **k: calls.append(1) or kernel_gemm(*a, **k))
  runs = []
  for kernel in ("xla", "mosaic_gpu"):
    fmt = matmul.MatmulFormat("fp8_blockwise", kernel=kernel)
    out, vjp = jax.vjp(lambda a, b: matmul.weight_matmul("BTD,DF->BTF", a, b, dtype=jnp.float32,
                                                         fmt=fmt), x, w)
    runs.append((out, *vjp(g)))
  assert len(calls) == 2  # Fprop and Dgrad
  for xla, kernel in zip(*runs):
    np.testing.assert_allclose(kernel, xla, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="FP8 GEMM kernel must be one of"):
    matmul.MatmulFormat("fp8_blockwise", kernel="cutlass")


def test_the_grouped_mosaic_gpu_kernel_adapter_is_the_quantised_tile_product():
  """``mosaic_gpu_grouped_gemm`` (Mosaic GPU's CPU interpreter here): 128-row tiles of one
  expert each, weights quantised per expert, as the XLA path's fake-quantised tile product."""
  from deepseek_jax.ops.grouped_matmul import tile_matmul
  from deepseek_jax.quant import fp8
  from pallas_kernels.fp8_gemm import kernel_mgpu
  if not kernel_mgpu.INTERPRET_SUPPORTED:
    pytest.skip(f"jax {jax.__version__} has no Mosaic GPU interpreter")
  x_tiles = jax.random.normal(jax.random.key(0), (5, 128, 192))
  w = 0.05 * jax.random.normal(jax.random.key(1), (3, 192, 136))
  tile_group = jnp.array([0, 0, 2, 2, 2])  # expert 1 has no rows
  got = matmul.mosaic_gpu_grouped_gemm(x_tiles, w, tile_group)
  want = tile_matmul(fp8.fake_quant_tiles(x_tiles), fp8.fake_quant_blocks(w), tile_group)
  assert got.shape == (5, 128, 136) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eqn,x_shape,w_shape", [
    ("BTD,DF->BTF", (2, 3, 4), (4, 5)),            # merged: B, T
    ("BSC,CNH->BSNH", (2, 3, 4), (4, 2, 3)),       # merged: B, S; two weight axes out
    ("BTNV,NVD->BTD", (2, 3, 2, 4), (2, 4, 5)),    # merged: B, T; N, V contracted
    ("BTNH,CNH->BTNC", (2, 3, 2, 4), (5, 2, 4)),   # merged: B, T; N kept as a batch axis
    ("TD,DE->TE", (3, 4), (4, 5)),                 # one leading axis: nothing to merge
])
def test_weight_matmul_with_merged_leading_axes_is_the_einsum(eqn, x_shape, w_shape):
  """The chokepoint merges the activation's leading free axes into one row axis (XLA:CPU runs
  the 2-D products faster); values and both gradients are the einsum's."""
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  ours = lambda x, w: matmul.weight_matmul(eqn, x, w, dtype=jnp.float32)
  ref = lambda x, w: jnp.einsum(eqn, x, w)
  out, vjp = jax.vjp(ours, x, w)
  want, vjp_want = jax.vjp(ref, x, w)
  assert out.shape == want.shape
  ct = jax.random.normal(kc, out.shape)
  for got, exp in zip((out, *vjp(ct)), (want, *vjp_want(ct))):
    np.testing.assert_allclose(got, exp, rtol=1e-6, atol=1e-6)
