"""The PPO baseline's value model and its loss: the policy's architecture with a scalar head,
trained by the shared train step with its own optimizer state.

Axis legend: B rows, T tokens, D d_model.

``ValueModel`` wraps a ``DeepSeekModel`` (``backbone``: its own copy of the weights, initialised
from the policy, as DeepSeekMath's and InstructGPT's PPO do) and reads V(s_t) from the final
normed hidden state with a [D, 1] head initialised to zero (every value starts at 0). The
vocabulary head of the backbone goes unused, and XLA drops it. Router biases of the backbone are
updated by the shared step like the policy's (``train.moe_step.router_bias_post_step`` finds the
backbone).

``ValueLoss`` is PPO's clipped value loss (Schulman et al. 2017; the form of OpenAI baselines,
TRL and verl): 1/2 max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2), a mean
over completion tokens. Its batch adds to the rollout batch ``returns`` and ``old_values``
[B, T] float32 (``advantages.gae``'s returns and the values the rollout saw).

Everything GRPO removes is here: the value model is a second copy of the policy's weights and
of its Adam moments, and a second forward/backward per step.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model.layers import param
from deepseek_jax.model.transformer import DeepSeekModel
from deepseek_jax.train.moe_step import add_moe_terms, finish_moe_metrics


class ValueModel(nnx.Module):
  """V(s_t) [B, T] float32 for every position of ``tokens`` [B, T] (module doc)."""

  def __init__(self, backbone: DeepSeekModel):
    self.backbone = backbone
    d = backbone.config.d_model
    self.value_head = param(jnp.zeros((d, 1), backbone.config.param_dtype), ("embed", None))

  @property
  def config(self):
    return self.backbone.config

  def __call__(self, tokens, *, positions=None, mask=None):
    """(values [B, T] float32, the backbone's moe_stats or None)."""
    out = self.backbone(tokens, positions=positions, mask=mask)
    hidden = out.hidden.astype(jnp.float32)
    values = (hidden @ self.value_head[...].astype(jnp.float32))[..., 0]
    return values, out.moe_stats


def value_model_from_policy(policy: DeepSeekModel) -> ValueModel:
  """A value model whose backbone is a copy of ``policy``'s weights (the policy is unchanged)."""
  graphdef, state = nnx.split(policy)
  backbone = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  return ValueModel(backbone)


class ValueNormalizers(NamedTuple):
  """Global-batch divisors: completion ``tokens``; ``balance`` = 1 / micro-batches."""

  tokens: jax.Array
  balance: jax.Array


@dataclasses.dataclass(frozen=True)
class ValueLoss:
  """PPO's clipped value loss as a ``train.loss.Loss`` for a ``ValueModel`` (module doc).

  ``clip_range_value`` eps_v (0 = unclipped). Metrics: ``value_loss``, ``value_mean`` and
  ``value_clip_fraction`` (token means), ``tokens``, and the MoE terms. Raises ValueError for a
  negative clip range."""

  clip_range_value: float = 0.2

  def __post_init__(self):
    if self.clip_range_value < 0:
      raise ValueError(f"clip_range_value must be >= 0, got {self.clip_range_value}")

  def normalizers(self, batch: dict, n_micro: int) -> ValueNormalizers:
    return ValueNormalizers(jnp.maximum(batch["mask"].astype(jnp.float32).sum(), 1.0),
                            jnp.float32(1.0 / n_micro))

  def __call__(self, model, batch: dict, *, normalizers: ValueNormalizers, step: jax.Array):
    del step
    mask = batch["mask"].astype(jnp.float32)
    values, stats = model(batch["inputs"], positions=batch.get("positions"),
                          mask=batch.get("token_mask", mask))
    real = mask > 0
    returns = jnp.where(real, batch["returns"].astype(jnp.float32), 0.0)
    old = jnp.where(real, batch["old_values"].astype(jnp.float32), 0.0)
    values = jnp.where(real, values, 0.0)
    loss = value_loss_per_token(values, old, returns, self.clip_range_value)
    total = jnp.where(real, loss, 0.0).sum() / normalizers.tokens
    clipped = real & (jnp.abs(values - old) > self.clip_range_value) if self.clip_range_value \
        else jnp.zeros_like(real)
    metrics = {"value_loss": total, "value_mean": values.sum() / normalizers.tokens,
               "value_clip_fraction": clipped.sum() / normalizers.tokens,
               "tokens": mask.sum()}
    total, metrics = add_moe_terms(total, metrics, stats, normalizers.balance)
    metrics["loss"] = total
    return total, metrics

  def finish(self, metrics: dict, *, step: jax.Array, n_micro: int) -> dict:
    del step
    return finish_moe_metrics(metrics, n_micro)


def value_loss_per_token(values, old_values, returns, clip_range_value: float):
  """1/2 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2) per token (float32);
  ``clip_range_value`` 0 gives the plain 1/2 (V - R)^2."""
  unclipped = jnp.square(values - returns)
  if not clip_range_value:
    return 0.5 * unclipped
  clipped = old_values + jnp.clip(values - old_values, -clip_range_value, clip_range_value)
  return 0.5 * jnp.maximum(unclipped, jnp.square(clipped - returns))
