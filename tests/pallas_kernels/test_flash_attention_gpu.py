"""The GPU (Triton-lowered) flash-attention kernels against the pure-JAX reference.

Numerics run in Pallas interpret mode on CPU: forward (out, lse) against `attention_reference`,
backward (dq, dk, dv) against `jax.vjp` of it, over seeded shapes with several q and kv blocks
(so causal block skipping and the diagonal blocks are exercised), packed documents whose
boundaries ignore the blocks, MLA's H=192 / V=128 head dims and smaller ones. The lowering tests
run the real Triton lowering for CUDA at MLA training shapes on this GPU-less machine.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import kernel_gpu
from pallas_kernels.flash_attention.reference import attention_reference

TRITON_CALL = "__gpu$xla.gpu.triton"

# (batch, heads, T, H, V, block_q, block_kv, causal, packed, dtype)
CASES = {
    "mla_causal_packed": (1, 2, 128, 192, 128, 32, 64, True, True, jnp.float32),
    "mla_causal_long": (2, 1, 256, 192, 128, 64, 32, True, False, jnp.float32),
    "mla_bidirectional_packed": (1, 1, 128, 192, 128, 64, 32, False, True, jnp.float32),
    "small_bidirectional": (2, 2, 256, 64, 32, 64, 64, False, False, jnp.float32),
    "odd_head_dims_causal_packed": (2, 2, 64, 96, 48, 32, 32, True, True, jnp.float32),
    "mla_bf16_causal_packed": (1, 2, 128, 192, 128, 64, 64, True, True, jnp.bfloat16),
}
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1.5e-2}  # of max |reference|


def _packed_segment_ids(rng, b, t, docs=4):
  """[B, T] int32: each row cut into `docs` documents at random (unaligned) positions."""
  rows = []
  for _ in range(b):
    starts = np.zeros(t, bool)
    starts[rng.choice(np.arange(1, t), docs - 1, replace=False)] = True
    rows.append(np.cumsum(starts))
  return jnp.asarray(np.stack(rows), jnp.int32)


def _inputs(name):
  b, n, t, h, d_v, _, _, _, packed, dtype = CASES[name]
  rng = np.random.default_rng(sorted(CASES).index(name))
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
  q, k = normal(b, n, t, h), normal(b, n, t, h)
  v, d_out = normal(b, n, t, d_v), normal(b, n, t, d_v)
  segment_ids = _packed_segment_ids(rng, b, t) if packed else None
  return q, k, v, d_out, segment_ids


def _kwargs(name):
  _, _, _, h, _, block_q, block_kv, causal, _, _ = CASES[name]
  return dict(softmax_scale=h ** -0.5, causal=causal, block_q=block_q, block_kv=block_kv)


@functools.partial(jax.jit, static_argnames=("softmax_scale", "causal"))
def _reference(q, k, v, segment_ids, *, softmax_scale, causal):
  """attention_reference in the kernel layout [B, N, T, H]."""
  to_model = lambda x: x.transpose(0, 2, 1, 3)  # [B,N,T,H] <-> [B,T,N,H]
  out, lse = attention_reference(to_model(q), to_model(k), to_model(v), segment_ids,
                                 softmax_scale=softmax_scale, causal=causal)
  return to_model(out), lse


@functools.partial(jax.jit, static_argnames=("softmax_scale", "causal"))
def _reference_vjp(q, k, v, segment_ids, d_out, *, softmax_scale, causal):
  """(dq, dk, dv) of the reference's out, by XLA autodiff."""
  _, vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, segment_ids, softmax_scale=softmax_scale,
                                              causal=causal)[0], q, k, v)
  return vjp(d_out)


def _assert_close(actual, expected, dtype, what):
  assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert np.isfinite(actual).all(), what
  tol = TOLERANCE[jnp.dtype(dtype)] * np.abs(expected).max()
  np.testing.assert_allclose(actual, expected, rtol=0, atol=tol, err_msg=what)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_reference_out_and_lse(name):
  q, k, v, _, segment_ids = _inputs(name)
  kw = _kwargs(name)
  out, lse = kernel_gpu.flash_forward(q, k, v, segment_ids, interpret=True, **kw)
  kw.pop("block_q"), kw.pop("block_kv")
  out_ref, lse_ref = _reference(q, k, v, segment_ids, **kw)
  _assert_close(out, out_ref, q.dtype, "out")
  _assert_close(lse, lse_ref, q.dtype, "lse")


@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_matches_vjp_of_reference(name):
  q, k, v, d_out, segment_ids = _inputs(name)
  kw = _kwargs(name)
  out, lse = kernel_gpu.flash_forward(q, k, v, segment_ids, interpret=True, **kw)
  grads = kernel_gpu.flash_backward(q, k, v, segment_ids, out, lse, d_out, interpret=True, **kw)
  kw.pop("block_q"), kw.pop("block_kv")
  grads_ref = _reference_vjp(q, k, v, segment_ids, d_out, **kw)
  for what, grad, grad_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
    _assert_close(grad, grad_ref, q.dtype, what)


def test_unsupported_reason_accepts_mla_and_names_what_it_cannot_do():
  mla_q, mla_v = (1, 16, 4096, 192), (1, 16, 4096, 128)
  assert kernel_gpu.unsupported_reason(mla_q, mla_q, mla_v) is None
  assert kernel_gpu.unsupported_reason((2, 4, 32, 64), (2, 4, 32, 64), (2, 4, 32, 32)) is None
  assert "T=200" in kernel_gpu.unsupported_reason((1, 1, 200, 64), (1, 1, 200, 64),
                                                  (1, 1, 200, 64))
  assert "H=200" in kernel_gpu.unsupported_reason((1, 1, 256, 200), (1, 1, 256, 200),
                                                  (1, 1, 256, 64))
  assert "self-attention" in kernel_gpu.unsupported_reason(mla_q, (1, 16, 2048, 192),
                                                           (1, 16, 2048, 128))
  assert "block_q" in kernel_gpu.unsupported_reason(mla_q, mla_q, mla_v, block_q=48)
  q = jnp.zeros((1, 1, 200, 64))
  with pytest.raises(ValueError, match="T=200"):
    kernel_gpu.flash_forward(q, q, q, None, softmax_scale=1.0, interpret=True)


# --------------------------------------------------------------------------- CUDA lowering
MLA_TRAINING = dict(b=1, n=16, t=4096, h=192, d_v=128)


def _mla_specs():
  b, n, t, h, d_v = MLA_TRAINING.values()
  spec = jax.ShapeDtypeStruct
  return (spec((b, n, t, h), jnp.bfloat16), spec((b, n, t, h), jnp.bfloat16),
          spec((b, n, t, d_v), jnp.bfloat16), spec((b, t), jnp.int32),
          spec((b, n, t), jnp.float32))


def test_forward_lowers_to_one_triton_kernel_for_cuda_at_mla_shapes(lower_for_cuda):
  q, k, v, segment_ids, _ = _mla_specs()
  fn = lambda q, k, v, s: kernel_gpu.flash_forward(q, k, v, s, softmax_scale=0.135)
  assert lower_for_cuda(fn, q, k, v, segment_ids).count(TRITON_CALL) == 1


def test_backward_lowers_to_two_triton_kernels_for_cuda_at_mla_shapes(lower_for_cuda):
  q, k, v, segment_ids, lse = _mla_specs()
  fn = lambda q, k, v, s, o, lse, do: kernel_gpu.flash_backward(q, k, v, s, o, lse, do,
                                                                softmax_scale=0.135)
  assert lower_for_cuda(fn, q, k, v, segment_ids, v, lse, v).count(TRITON_CALL) == 2
