"""``flash_attention``: MLA training/prefill attention through a Pallas kernel, with gradients.

The one function the model calls. It picks the kernel for the platform being compiled for
(TPU: Mosaic kernels in kernel_tpu.py; GPU: kernel_gpu.py; CPU: the TPU-style kernels in
interpret mode, for tests) and wires its forward and backward kernels into ``jax.custom_vjp``:
the forward saves (q, k, v, out, lse), the backward recomputes the probabilities blockwise
(FlashAttention-2), so no [T, S] matrix is ever stored. Shapes a kernel cannot take (its
``unsupported_reason`` says why) fall back to the XLA reference, with one log line.

Layout: the model's [B, T, N, H]; the kernels use [B, N, T, H], transposed here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import reference
from pallas_kernels.platform import kernel_backend, warn_fallback

IMPLS = ("xla", "pallas")


def _kernel_module(backend: str):
  if backend == "gpu":
    from pallas_kernels.flash_attention import kernel_gpu
    return kernel_gpu
  from pallas_kernels.flash_attention import kernel_tpu
  return kernel_tpu


@dataclasses.dataclass(frozen=True)
class _Kernel:
  backend: str  # "tpu" | "gpu"
  softmax_scale: float
  causal: bool
  interpret: bool
  blocks: tuple  # sorted (name, value) pairs passed to the kernels

  def call(self, fn_name: str, *args):
    fn = getattr(_kernel_module(self.backend), fn_name)
    return fn(*args, softmax_scale=self.softmax_scale, causal=self.causal,
              interpret=self.interpret, **dict(self.blocks))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, segment_ids, kernel: _Kernel):
  return kernel.call("flash_forward", q, k, v, segment_ids)[0]


def _attention_fwd(q, k, v, segment_ids, kernel):
  out, lse = kernel.call("flash_forward", q, k, v, segment_ids)
  return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(kernel, residuals, d_out):
  q, k, v, segment_ids, out, lse = residuals
  dq, dk, dv = kernel.call("flash_backward", q, k, v, segment_ids, out, lse, d_out)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    segment_ids: Optional[jax.Array] = None, *, softmax_scale: float,
                    causal: bool = True, impl: str = "pallas", backend: Optional[str] = None,
                    interpret: Optional[bool] = None, **blocks) -> jax.Array:
  """softmax(scale q k^T, causal and same-segment) v: q [B,T,N,H], k [B,T,N,H], v [B,T,N,V].

  impl: "pallas" (a kernel, falling back to XLA where it cannot run) or "xla" (the reference).
  backend: "tpu" | "gpu" kernel family; default: the platform being compiled for (CPU runs the
  TPU kernels in interpret mode). interpret: default True exactly when that platform is CPU.
  blocks: kernel block sizes (block_q, block_kv, ...), default: the kernel's own.
  """
  if impl not in IMPLS:
    raise ValueError(f"flash_attention impl must be one of {IMPLS}, got {impl!r}")
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"flash_attention is self-attention: q has {q.shape[1]} tokens, k has "
                     f"{k.shape[1]}")
  backend, interpret = kernel_backend(backend, interpret)
  if impl == "pallas":
    reason = _kernel_module(backend).unsupported_reason(
        _bnth(q.shape), _bnth(k.shape), _bnth(v.shape), **blocks)
    if reason is not None:
      warn_fallback("flash_attention", f"{backend} kernel: {reason}")
      impl = "xla"
  if impl == "xla":
    return reference.attention_reference(q, k, v, segment_ids, softmax_scale=softmax_scale,
                                         causal=causal)[0]
  kernel = _Kernel(backend, float(softmax_scale), causal, interpret, tuple(sorted(blocks.items())))
  swap = lambda x: jnp.swapaxes(x, 1, 2)
  out = _attention(swap(q), swap(k), swap(v), segment_ids, kernel)
  return swap(out)


def _bnth(shape):
  b, t, n, h = shape
  return (b, n, t, h)
