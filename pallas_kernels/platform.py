"""Which platform a kernel is being compiled for."""

from __future__ import annotations

import jax


def target_platform() -> str:
  """The platform being compiled for: the context mesh's (``jax.set_mesh``; it may be an
  ahead-of-time TPU topology on a CPU host), else the default backend ("cpu" | "gpu" | "tpu")."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()
