"""Shared fixtures: tiny float32 models on CPU, built once per configuration."""

import functools

import jax
import pytest

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.transformer import create_model

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
