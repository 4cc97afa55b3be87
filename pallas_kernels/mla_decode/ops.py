"""``mla_decode``: absorbed MLA decoding over a contiguous or paged latent cache.

The one function the model calls for s_q <= 2 new tokens per row. It picks the kernel for the
platform being compiled for (TPU: kernel_tpu.py; GPU: kernel_gpu.py; CPU: the TPU kernel in
interpret mode, for tests) and falls back to the XLA reference, with one log line, for shapes a
kernel cannot take. Both kernels read paged caches; a contiguous cache [B, S, X] is the paged
cache whose row b owns pages b*M .. b*M + M - 1 (a free reshape, no copy).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.mla_decode import reference
from pallas_kernels.platform import kernel_backend, warn_fallback

IMPLS = ("xla", "pallas")
PAGE_SIZE = 64  # FlashMLA's page (block) size


def _kernel_module(backend: str):
  if backend == "gpu":
    from pallas_kernels.mla_decode import kernel_gpu
    return kernel_gpu
  from pallas_kernels.mla_decode import kernel_tpu
  return kernel_tpu


def contiguous_as_pages(c_kv: jax.Array, k_rope: jax.Array, first_row: jax.Array | int = 0,
                        n_rows: Optional[int] = None, page_size: int = PAGE_SIZE):
  """Contiguous caches [..., S, C], [..., S, R] as pages [rows*M, G, C], [rows*M, G, R] (a free
  reshape; leading dims are flattened into rows) and the block table [n_rows, M] of rows
  first_row .. first_row + n_rows - 1 (default: all rows)."""
  slots = c_kv.shape[-2]
  if slots % page_size:
    raise ValueError(f"a contiguous cache of {slots} slots is not a whole number of "
                     f"{page_size}-slot pages; allocate a multiple of {page_size} slots")
  per_row = slots // page_size
  to_pages = lambda x: x.reshape(-1, page_size, x.shape[-1])
  c_pages, r_pages = to_pages(c_kv), to_pages(k_rope)
  n_rows = c_pages.shape[0] // per_row if n_rows is None else n_rows
  table = (first_row * per_row
           + jnp.arange(n_rows * per_row, dtype=jnp.int32).reshape(n_rows, per_row))
  return c_pages, r_pages, table


def mla_decode(q: jax.Array, c_kv: jax.Array, k_rope: jax.Array, lengths: jax.Array,
               block_table: Optional[jax.Array] = None, *, softmax_scale: float,
               causal: bool = True, impl: str = "pallas", backend: Optional[str] = None,
               interpret: Optional[bool] = None, num_splits: Optional[int] = None
               ) -> tuple[jax.Array, jax.Array]:
  """Latent attention of q [B,T,N,C+R] over a latent cache; see reference.mla_decode_reference.

  Contiguous cache: c_kv [B,S,C], k_rope [B,S,R], block_table None. Paged cache: c_kv [P,G,C],
  k_rope [P,G,R], block_table [B,M]. lengths [B]: valid slots per row, the T new ones included
  (1 <= T <= lengths[b]). Returns (out [B,T,N,C] in q.dtype, lse [B,T,N] float32).
  impl / backend / interpret: as in flash_attention.ops.flash_attention. num_splits: split-KV
  parallelism (default: the kernel's heuristic).
  """
  if impl not in IMPLS:
    raise ValueError(f"mla_decode impl must be one of {IMPLS}, got {impl!r}")
  width = c_kv.shape[-1]
  if q.shape[-1] != width + k_rope.shape[-1]:
    raise ValueError(f"q's last dim {q.shape[-1]} must be C + R = {width} + {k_rope.shape[-1]}")
  backend, interpret = kernel_backend(backend, interpret)
  if impl == "pallas":
    pages, reason = (c_kv, k_rope, block_table), None
    if block_table is None:
      if c_kv.shape[1] % PAGE_SIZE:
        reason = f"contiguous cache of {c_kv.shape[1]} slots is not a multiple of {PAGE_SIZE}"
      else:
        pages = contiguous_as_pages(c_kv, k_rope)
    if reason is None:
      reason = _kernel_module(backend).unsupported_reason(
          q.shape, pages[0].shape, pages[1].shape, pages[2].shape)
    if reason is not None:
      warn_fallback("mla_decode", f"{backend} kernel: {reason}")
      impl = "xla"
  if impl == "xla":
    return reference.mla_decode_reference(q, c_kv, k_rope, lengths, block_table,
                                          softmax_scale=softmax_scale, causal=causal)
  kwargs = dict(softmax_scale=float(softmax_scale), causal=causal, interpret=interpret)
  if num_splits is not None:
    kwargs["num_splits"] = num_splits
  return _kernel_module(backend).mla_decode(q, *pages[:2], lengths.astype(jnp.int32),
                                            pages[2].astype(jnp.int32), **kwargs)
