"""The TPU flash-attention kernels (interpret mode on CPU) against the pure-JAX reference.

Axis legend: B batch, N heads, T tokens, H = d_qk, V = d_v. The kernels take [B,N,T,H]; the
reference takes the model layout [B,T,N,H], so tests transpose at the boundary.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention.kernel_tpu import (flash_backward, flash_forward,
                                                       unsupported_reason)
from pallas_kernels.flash_attention.reference import attention_reference


def _to_model(x):  # [B,N,T,X] <-> [B,T,N,X]
  return jnp.swapaxes(x, 1, 2)


def _packed_segments(rng, batch: int, t: int, docs: int, block: int):
  """[B,T] int32 ids of `docs` packed documents, no boundary on a multiple of `block`."""
  starts = [p for p in range(1, t) if p % block]
  rows = [np.cumsum(np.isin(np.arange(t), rng.choice(starts, docs - 1, replace=False)))
          for _ in range(batch)]
  return jnp.asarray(np.stack(rows), jnp.int32)


def _inputs(seed, b, n, t, h, v, dtype, segments: bool, block: int):
  rng = np.random.RandomState(seed)
  draw = lambda *shape: jnp.asarray(rng.randn(*shape), jnp.float32).astype(dtype)
  q, k, val, d_out = draw(b, n, t, h), draw(b, n, t, h), draw(b, n, t, v), draw(b, n, t, v)
  seg = _packed_segments(rng, b, t, 4, block) if segments else None
  d_lse = jnp.asarray(rng.randn(b, n, t), jnp.float32)
  return q, k, val, seg, d_out, d_lse


def _reference_with_vjp(q, k, v, seg, d_out, d_lse, *, scale, causal):
  """Reference (out, lse) in kernel layout, and jax.vjp's (dq, dk, dv) for (d_out, d_lse)."""

  def ref(q, k, v):
    out, lse = attention_reference(_to_model(q), _to_model(k), _to_model(v), seg,
                                   softmax_scale=scale, causal=causal)
    return _to_model(out), lse

  (out, lse), vjp = jax.vjp(ref, q, k, v)
  return out, lse, vjp((d_out, d_lse))


def _assert_close(actual, expected, tol, name):
  """|actual - expected| <= tol * (1 + |expected|), elementwise, in float32."""
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  err = np.abs(actual - expected) / (1 + np.abs(expected))
  assert err.max() <= tol, f"{name}: max relative error {err.max():.3g} > {tol}"


# (seed, B, N, T, H, V, block_q, block_kv, causal, segments, with d_lse)
F32_CASES = [
    (0, 1, 2, 256, 192, 128, 64, 128, True, True, False),  # MLA dims, packed docs
    (1, 2, 1, 256, 64, 32, 128, 64, True, False, False),  # kv blocks finer than q blocks
    (2, 1, 3, 128, 64, 32, 64, 64, False, True, True),  # rows whose first kv blocks are all masked
]  # causal=False without segments runs in bfloat16 below


@pytest.mark.parametrize("seed,b,n,t,h,v,block_q,block_kv,causal,segments,with_d_lse", F32_CASES)
def test_forward_and_gradients_match_reference_in_float32(seed, b, n, t, h, v, block_q, block_kv,
                                                          causal, segments, with_d_lse):
  q, k, val, seg, d_out, d_lse = _inputs(seed, b, n, t, h, v, jnp.float32, segments,
                                         min(block_q, block_kv))
  scale = h ** -0.5
  kw = dict(softmax_scale=scale, causal=causal, block_q=block_q, block_kv=block_kv,
            interpret=True)
  if not with_d_lse:
    d_lse = jnp.zeros_like(d_lse)
  out, lse = flash_forward(q, k, val, seg, **kw)
  grads = flash_backward(q, k, val, seg, out, lse, d_out,
                         d_lse=d_lse if with_d_lse else None, **kw)
  ref_out, ref_lse, ref_grads = _reference_with_vjp(q, k, val, seg, d_out, d_lse, scale=scale,
                                                    causal=causal)
  assert out.shape == (b, n, t, v) and out.dtype == q.dtype
  assert lse.shape == (b, n, t) and lse.dtype == jnp.float32
  _assert_close(out, ref_out, 1e-5, "out")
  _assert_close(lse, ref_lse, 1e-5, "lse")
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert grad.shape == ref_grad.shape and grad.dtype == jnp.float32
    _assert_close(grad, ref_grad, 2e-5, name)


def test_bfloat16_forward_and_gradients_match_reference_within_bf16_rounding():
  b, n, t, h, v = 2, 2, 256, 192, 128
  q, k, val, seg, d_out, _ = _inputs(4, b, n, t, h, v, jnp.bfloat16, False, 128)
  scale = h ** -0.5
  kw = dict(softmax_scale=scale, causal=False, interpret=True)
  out, lse = flash_forward(q, k, val, seg, **kw)
  grads = flash_backward(q, k, val, seg, out, lse, d_out, **kw)
  ref_out, ref_lse, ref_grads = _reference_with_vjp(q, k, val, seg, d_out,
                                                    jnp.zeros((b, n, t)), scale=scale,
                                                    causal=False)
  assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  _assert_close(out, ref_out, 8e-3, "out")
  _assert_close(lse, ref_lse, 1e-5, "lse")  # scores are exact f32 products of bf16 inputs
  for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert grad.dtype == jnp.bfloat16
    _assert_close(grad, ref_grad, 1e-2, name)


def test_unsupported_reason_accepts_mla_shapes_and_names_what_it_cannot_tile():
  q, k, v = (1, 16, 2048, 192), (1, 16, 2048, 192), (1, 16, 2048, 128)
  assert unsupported_reason(q, k, v) is None
  assert unsupported_reason((1, 2, 64, 192), (1, 2, 64, 192), (1, 2, 64, 128)) is None  # one block
  assert "multiple" in unsupported_reason((1, 2, 200, 192), (1, 2, 200, 192), (1, 2, 200, 128))
  assert "lane" in unsupported_reason(q, k, v, block_kv=64)
  assert "self-attention" in unsupported_reason(q, (1, 16, 1024, 192), (1, 16, 1024, 128))
  assert "GQA" in unsupported_reason(q, (1, 1, 2048, 192), (1, 1, 2048, 128))


def test_kernels_compile_for_tpu_at_mla_shapes(compile_for_tpu):
  b, n, t, h, v = 1, 16, 2048, 192, 128
  spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
  q, k, val, d_out = spec((b, n, t, h)), spec((b, n, t, h)), spec((b, n, t, v)), spec((b, n, t, v))
  seg, lse = spec((b, t), jnp.int32), spec((b, n, t), jnp.float32)
  scale = 0.135
  forward = compile_for_tpu(
      lambda q, k, v, s: flash_forward(q, k, v, s, softmax_scale=scale), q, k, val, seg)
  backward = compile_for_tpu(
      lambda q, k, v, s, o, l, g: flash_backward(q, k, v, s, o, l, g, softmax_scale=scale),
      q, k, val, seg, d_out, lse, d_out)
  scores_bytes = b * n * t * t * 4
  for compiled in (forward, backward):
    assert "tpu_custom_call" in compiled.as_text()
    stats = compiled.memory_analysis()
    if stats is not None:  # no [T, S] score matrix is ever materialised in HBM
      assert stats.temp_size_in_bytes < scores_bytes // 16
