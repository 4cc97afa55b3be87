"""Rotary position embedding with YaRN context extension (DeepSeek-V2 App. C, V3 §4.3).

How it works
------------
RoPE rotates each pair (x_{2i}, x_{2i+1}) by the angle ``pos * f_i`` with f_i = theta^(-2i/R).
Pairs are *interleaved* (adjacent dims), DeepSeek's official layout, so released k_R weights and
caches need no permutation.

YaRN stretches the low frequencies by the scale s and leaves the high ones alone. With the
correction dimension cd(r) = R ln(L_orig / (2 pi r)) / (2 ln theta):

    low = floor(cd(beta_fast)), high = ceil(cd(beta_slow)), ramp_i = clip((i - low)/(high - low), 0, 1)
    f_i' = f_i / s * ramp_i + f_i * (1 - ramp_i)

and the attention logits are sharpened by mscale^2, mscale = 0.1 m ln(s) + 1 (applied to the
softmax scale by ModelConfig.softmax_scale). The rotary amplitude is multiplied by
mscale(s, m) / mscale(s, m_all_dim), which is 1 for every released config but kept for parity.
For V3 (R=64, theta=1e4, L=4096, s=40): low=10, high=23, softmax scale 0.135234.

Axis legend: B batch, T length, N heads, R rotary dims.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import yarn_get_mscale


def yarn_correction_range(dim: int, theta: float, original_max_len: int, beta_fast: float,
                          beta_slow: float) -> tuple[int, int]:
  """Indices (low, high) of the rotary pairs between which YaRN blends the frequencies."""

  def correction_dim(num_rotations: float) -> float:
    return dim * math.log(original_max_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

  low = math.floor(correction_dim(beta_fast))
  high = math.ceil(correction_dim(beta_slow))
  return max(low, 0), min(high, dim - 1)  # clamp as DeepSeek/HF do (dim - 1, not dim/2 - 1)


@dataclasses.dataclass(frozen=True)
class RotaryEmbedding:
  """Static description of the rotary map; hashable, so it lives on modules as static data."""

  dim: int
  theta: float = 10000.0
  yarn_factor: float = 1.0
  yarn_original_max_len: int = 4096
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_mscale: float = 1.0
  yarn_mscale_all_dim: float = 1.0

  def inv_freq(self) -> np.ndarray:
    """Per-pair angular frequency f_i' (float64 numpy, folded into the program as a constant)."""
    freq = 1.0 / (self.theta ** (np.arange(0, self.dim, 2, dtype=np.float64) / self.dim))
    if self.yarn_factor <= 1.0:
      return freq
    low, high = yarn_correction_range(self.dim, self.theta, self.yarn_original_max_len,
                                      self.yarn_beta_fast, self.yarn_beta_slow)
    if low == high:
      high += 0.001  # avoid 0/0 in the ramp, as the reference implementations do
    ramp = np.clip((np.arange(self.dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return freq / self.yarn_factor * ramp + freq * (1.0 - ramp)

  @property
  def amplitude(self) -> float:
    return (yarn_get_mscale(self.yarn_factor, self.yarn_mscale)
            / yarn_get_mscale(self.yarn_factor, self.yarn_mscale_all_dim))

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotate x [B, T, ..., R] by positions [B, T]; math in float32, result in x.dtype."""
    if self.dim == 0:
      return x
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(self.inv_freq(), jnp.float32)
    extra = x.ndim - angles.ndim  # broadcast over head axes between T and R
    angles = angles.reshape(angles.shape[:2] + (1,) * extra + angles.shape[2:])
    cos = jnp.cos(angles) * self.amplitude
    sin = jnp.sin(angles) * self.amplitude
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (self.dim // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def rotary_from_config(cfg) -> RotaryEmbedding:
  return RotaryEmbedding(
      dim=cfg.qk_rope_head_dim, theta=cfg.rope_theta, yarn_factor=cfg.yarn_factor,
      yarn_original_max_len=cfg.yarn_original_max_len, yarn_beta_fast=cfg.yarn_beta_fast,
      yarn_beta_slow=cfg.yarn_beta_slow, yarn_mscale=cfg.yarn_mscale,
      yarn_mscale_all_dim=cfg.yarn_mscale_all_dim)
