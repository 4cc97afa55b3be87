"""The device mesh: five named axes over every device of every process.

    stage   pipeline parallelism (the layer stack cut into stages; ``parallel.pipeline``)
    data    pure data parallelism (weights replicated across it)
    fsdp    data parallelism with weights, gradients and optimizer state sharded (ZeRO-3)
    expert  expert parallelism (routed experts split across it; also a data axis)
    tensor  tensor parallelism (heads / FFN hidden split)

Sizes come from the experiment config; one size may be -1 and takes what the others leave.
The batch is split over (data, fsdp, expert) (the stage axis holds layers, not rows); see
``partitioning.RULE_SETS`` for the weights.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from pallas_kernels import platform as _platform

MESH_AXES = ("stage", "data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")


def resolve_mesh_shape(shape: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
  """Sizes for MESH_AXES; raises ValueError naming the field when they cannot fit."""
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh: unknown axes {unknown}; the axes are {list(MESH_AXES)}")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  fill = [axis for axis, size in zip(MESH_AXES, sizes) if size == -1]
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{axis}={size}: sizes must be positive, or -1 for 'the rest'")
  if len(fill) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {fill}")
  known = math.prod(size for size in sizes if size != -1)
  if fill:
    if n_devices % known:
      raise ValueError(f"mesh: the fixed axes use {known} devices, which does not divide the "
                       f"{n_devices} available; change the mesh sizes")
    sizes[MESH_AXES.index(fill[0])] = n_devices // known
  elif known != n_devices:
    raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} uses {known} devices but "
                     f"{n_devices} are available; set one axis to -1 or fix the sizes")
  return tuple(sizes)


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh over ``devices`` (default: all devices of all processes) with Auto axes."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(shape, len(devices))
  try:
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  except (ValueError, NotImplementedError):  # topology-unaware fallback (e.g. fake CPU devices)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


target_platform = _platform.target_platform  # the platform being compiled for


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch is split: the product of the batch axes' sizes."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


class under_mesh:
  """``fn`` (a jitted function) called and lowered under ``jax.set_mesh(mesh)``: layers that
  read the context mesh (the MoE's expert parallelism) see it while ``fn`` is traced."""

  def __init__(self, fn, mesh: Mesh):
    self.fn, self.mesh = fn, mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.fn(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.fn.lower(*args, **kwargs)

