"""RoPE and YaRN against the paper's numbers and RoPE's defining property."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.rope import RotaryEmbedding, rotary_from_config, yarn_correction_range


def test_v3_yarn_correction_range_is_10_to_23():
  assert yarn_correction_range(64, 10000.0, 4096, 32.0, 1.0) == (10, 23)


def test_yarn_frequencies_blend_between_unscaled_and_scaled():
  rope = rotary_from_config(ModelConfig.preset("deepseek-v3"))
  base = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
  freq = rope.inv_freq()
  np.testing.assert_allclose(freq[:11], base[:11])  # ramp 0 up to low = 10: untouched
  np.testing.assert_allclose(freq[23:], base[23:] / 40.0)  # ramp 1 from high = 23: divided by s
  ramp = (16 - 10) / (23 - 10)
  assert freq[16] == pytest.approx(base[16] / 40 * ramp + base[16] * (1 - ramp))


def test_rotation_is_interleaved_pairs():
  rope = RotaryEmbedding(dim=4, theta=10000.0)
  x = jnp.array([[[1.0, 0.0, 1.0, 0.0]]])  # [B=1, T=1, R=4]
  out = rope(x, jnp.array([[1]]))
  f1 = 1.0 / 10000 ** 0.5
  np.testing.assert_allclose(out[0, 0], [math.cos(1), math.sin(1), math.cos(f1), math.sin(f1)],
                             rtol=1e-6)


@pytest.mark.parametrize("yarn_factor", [1.0, 40.0])
def test_scores_depend_only_on_relative_position(yarn_factor):
  rope = RotaryEmbedding(dim=16, yarn_factor=yarn_factor, yarn_original_max_len=64)
  kq, kk = jax.random.split(jax.random.key(0))
  q, k = jax.random.normal(kq, (1, 1, 16)), jax.random.normal(kk, (1, 1, 16))
  score = lambda pq, pk: jnp.sum(rope(q, jnp.array([[pq]])) * rope(k, jnp.array([[pk]])))
  assert score(7, 3) == pytest.approx(float(score(104, 100)), rel=1e-4)
  assert score(7, 3) != pytest.approx(float(score(7, 4)), rel=1e-3)


def test_rotation_broadcasts_over_heads_and_preserves_norm():
  rope = RotaryEmbedding(dim=8)
  x = jax.random.normal(jax.random.key(1), (2, 5, 3, 8))  # [B, T, N, R]
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  out = rope(x, pos)
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(out[:, :, 1], rope(x[:, :, 1], pos), rtol=1e-6)
