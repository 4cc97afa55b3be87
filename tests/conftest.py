"""Shared fixtures: tiny float32 models on CPU, built once per configuration.

In-process tests see 8 fake CPU devices (mesh tests need them; everything else runs on device
0). Tests that launch the trainer do so in subprocesses with their own environment.
"""

import functools
import gc
import os

import glob  # noqa: E402
import importlib.util  # noqa: E402

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
if importlib.util.find_spec("libtpu") and not glob.glob("/dev/accel*") + glob.glob("/dev/vfio/[0-9]*"):
  # The test extras install libtpu only to compile TPU programs ahead of time (tests/
  # pallas_kernels); on a host without TPU chips, JAX would otherwise try (and noisily fail) to
  # start a TPU backend in every process, subprocesses included.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # pytest-xdist workers each load libtpu; without this only the first may (a lockfile).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

from deepseek_jax import cli  # noqa: E402

# The xdist workers and the subprocesses tests launch inherit this environment: malloc on
# transparent huge pages, as the entry points restart themselves with (cli.use_huge_pages).
os.environ.update(cli.huge_page_environment(os.environ) or {})

from deepseek_jax.config import ModelConfig  # noqa: E402
from deepseek_jax.model.transformer import create_model  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@functools.lru_cache(maxsize=None)
def _cached_model(preset: str, seed: int, overrides: tuple):
  return create_model(ModelConfig.preset(preset, **dict(overrides)), seed)


@pytest.fixture(scope="session")
def make_model():
  """make_model(preset="tiny", seed=0, **overrides) -> a shared, initialised DeepSeekModel.

  Shared across tests: a test that mutates a model must build its own with create_model.
  """

  def make(preset: str = "tiny", seed: int = 0, **overrides):
    return _cached_model(preset, seed, tuple(sorted(overrides.items())))

  return make


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """Drop JAX's compiled programs after each test file. Every XLA:CPU executable keeps its
  machine code in its own memory mappings; one xdist worker running half the suite (eager
  module calls compile op by op) passed the kernel's limit of 65,530 mappings per process
  (vm.max_map_count), and the next compile died with a segmentation fault."""
  yield
  jax.clear_caches()
  gc.collect()
