"""Ahead-of-time TPU compilation and CUDA lowering for kernel tests, on a machine without either.

With ``jax[tpu]`` installed (libtpu present), ``compile_for_tpu(fn, *args)`` lowers and compiles
``jax.jit(fn)`` for one chip of a TPU topology description, so Mosaic kernels are proven to lower
for real TPUs; ``args`` are arrays or ``jax.ShapeDtypeStruct``s. Without libtpu the test is skipped
with a message saying how to enable it; with libtpu installed (the test extra) a topology that
cannot be made fails the test.
"""

import contextlib
import functools
import importlib.util

import jax
import pytest

TOPOLOGY = "v5e:2x2"


@functools.lru_cache(maxsize=None)
def _tpu_devices():
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY).devices
  except Exception as e:  # no libtpu: jax[tpu] is not installed
    return f"{type(e).__name__}: {e}"


@pytest.fixture
def tpu_devices():
  """The 4 chips of a v5e:2x2 topology description (for meshes in AOT compiles)."""
  devices = _tpu_devices()
  if isinstance(devices, str) and importlib.util.find_spec("libtpu"):
    # libtpu is installed (the test extra): a failure here must not pass as a skip.
    pytest.fail(f"libtpu is installed but the TPU topology could not be made: {devices[:300]}")
  if isinstance(devices, str):
    pytest.skip(f"TPU ahead-of-time compile needs libtpu (pip install 'jax[tpu]=="
                f"{jax.__version__}'): {devices[:200]}")
  return devices


@pytest.fixture
def compile_for_tpu(tpu_devices):
  sharding = jax.sharding.SingleDeviceSharding(tpu_devices[0])

  def compile_(fn, *args, **jit_kwargs):
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
    return jax.jit(fn, **jit_kwargs).lower(*specs).compile()

  return compile_


def _abstract_h100():
  """jax >= 0.11 asks the device for its compute capability while lowering GPU kernels: name
  an H100 when there is none (jax 0.10 lowers without asking)."""
  if not hasattr(jax.sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="gpu")
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))


@pytest.fixture
def lower_for_cuda():
  """lower_for_cuda(fn, *args) -> StableHLO text of jit(fn) lowered for CUDA (see _lower_for_cuda)."""
  return _lower_for_cuda


def _lower_for_cuda(fn, *args, **kwargs) -> str:
  """StableHLO text of jit(fn) lowered for CUDA on this (CPU) host: the Triton and Mosaic GPU
  lowerings run, so a kernel that would not lower fails here; PTX compilation does not run."""
  with _abstract_h100():
    return jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",)).as_text()
