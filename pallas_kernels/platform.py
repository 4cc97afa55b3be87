"""Which platform a kernel is being compiled for, and which kernel family serves it."""

from __future__ import annotations

import functools
import logging
from typing import Optional

import jax


def target_platform() -> str:
  """The platform being compiled for: the context mesh's (``jax.set_mesh``; it may be an
  ahead-of-time TPU topology on a CPU host), else the default backend ("cpu" | "gpu" | "tpu")."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def kernel_backend(backend: Optional[str], interpret: Optional[bool]) -> tuple[str, bool]:
  """(kernel family "tpu" | "gpu", interpret) for the target platform, unless given: GPU
  kernels on GPU, TPU kernels elsewhere; interpret mode exactly when compiling for CPU."""
  platform = target_platform()
  backend = backend or ("gpu" if platform == "gpu" else "tpu")
  return backend, platform == "cpu" if interpret is None else interpret


@functools.lru_cache(maxsize=None)
def warn_fallback(op: str, reason: str) -> None:
  """One log line per (op, reason) when an op runs its XLA reference instead of a kernel."""
  logging.warning("%s: using the XLA path: %s", op, reason)
