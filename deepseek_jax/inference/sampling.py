"""Sampling from logits and what generation returns: ``SamplingConfig`` (greedy, temperature,
top-k, top-p), the distribution it draws from (``sampling_logits``), draws, and
``GenerateOutput``. Shared by ``generate`` and speculative decoding (``speculative``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p must lie in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be >= 0, got {self.top_k}")


def sampling_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """The logits [..., V] of the distribution ``sampling`` draws from, float32: divided by the
  temperature, then -inf outside the top-k and outside the nucleus (top-p). Temperature 0
  (greedy) leaves the logits as they are (temperature 1, no filter): the log-probabilities
  ``generate`` reports for greedy tokens are the model's own."""
  logits = logits.astype(jnp.float32)
  if sampling.temperature == 0.0:
    return logits
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # the top token always survives
    cutoff = jnp.min(jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf), axis=-1,
                     keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """Next tokens [B] from logits [B, V] (float32): greedy, temperature, top-k, nucleus."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, sampling_logits(logits, sampling), axis=-1).astype(jnp.int32)


class GenerateOutput(NamedTuple):
  """What ``generate`` returns: the new tokens of each row, how many of them are real,
  (``return_log_probs=True``) each token's log-probability under the sampling distribution, and
  with ``speculative="mtp"`` the drafts proposed and accepted at each depth."""

  tokens: jax.Array  # [B, N] generated tokens (stop token included), pad_id afterwards
  lengths: jax.Array  # [B] number of generated tokens per row
  log_probs: Optional[jax.Array] = None  # [B, N] float32, 0 past each row's length
  drafted: Optional[jax.Array] = None  # [B, K] int32: steps whose depth-k draft could count
  accepted: Optional[jax.Array] = None  # [B, K] int32: of those, depth-k drafts in the output

  def acceptance_rate(self) -> Optional[jax.Array]:
    """[K] float32: accepted / proposed drafts at each depth over all rows (None without
    speculative decoding). Unconditional: a depth-k draft counts as accepted only when the
    k - 1 before it were; drafts past a stop token or past max_new_tokens are left out. V3
    §5.4.3 reports 85-90% at depth 1."""
    if self.drafted is None:
      return None
    return self.accepted.sum(0) / jnp.maximum(self.drafted.sum(0), 1)

  def mask(self) -> jax.Array:
    """[B, N] float32 completion mask: 1 on each row's real tokens (its stop token included),
    0 on the padding after it."""
    return (jnp.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]).astype(jnp.float32)
