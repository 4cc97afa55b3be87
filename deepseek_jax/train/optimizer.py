"""Optimizer and schedules (DeepSeek-V3 §4.2): AdamW(0.9, 0.95, wd 0.1), clipping, LR schedules,
the MTP-weight schedule and the router-bias rate schedule.

Weight decay applies to matrices only: norm scales (and any bias) are masked off. The router's
balancing bias is not a parameter at all (``RouterBias`` state), so the optimizer never sees it.
``moment_dtype="bfloat16"`` stores both Adam moments in bf16 (V3 keeps them in BF16); the update
itself is computed in float32.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

NO_DECAY_NAMES = ("scale", "bias")  # RMSNorm scales (and biases, if a layer has one)


def lr_schedule(cfg) -> optax.Schedule:
  """cfg fields: schedule ('cosine' | 'wsd' | 'constant'), learning_rate, warmup_steps,
  total_steps, final_lr_fraction, decay_fraction (wsd: share of steps spent decaying)."""
  peak, warmup, total = cfg.learning_rate, cfg.warmup_steps, cfg.total_steps
  final = peak * cfg.final_lr_fraction
  if cfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                                 optax.constant_schedule(peak)], [warmup])
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(total, warmup + 1),
                                              end_value=final)
  if cfg.schedule == "wsd":  # warmup, stable plateau, then a linear decay (MiniCPM / V3-style)
    decay = max(int(total * cfg.decay_fraction), 1)
    stable = max(total - warmup - decay, 0)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak),
         optax.linear_schedule(peak, final, decay)], [warmup, warmup + stable])
  raise ValueError(f"optimizer.schedule must be 'cosine', 'wsd' or 'constant', got {cfg.schedule!r}")


def piecewise_constant(boundaries_and_values: Sequence[Sequence[float]]):
  """[(start_step, value), ...] -> step -> value in force (sorted by start step)."""
  points = sorted((int(s), float(v)) for s, v in boundaries_and_values)
  if not points or points[0][0] != 0:
    raise ValueError(f"a piecewise schedule must start at step 0, got {boundaries_and_values}")

  def schedule(step):
    value = jnp.float32(points[0][1])
    for start, v in points[1:]:
      value = jnp.where(step >= start, jnp.float32(v), value)
    return value

  return schedule


class ScaleByAdamState(NamedTuple):
  """Adam's step count and both moments (stored in ``moment_dtype``)."""

  count: jax.Array
  mu: Any
  nu: Any


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype: str) -> optax.GradientTransformation:
  """Adam with both moments stored in ``moment_dtype`` (optax's ``mu_dtype`` covers only mu)."""
  dtype = jnp.dtype(moment_dtype)

  def init(params):
    zeros = lambda p: jnp.zeros(p.shape, dtype)
    return ScaleByAdamState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params),
                            jax.tree.map(zeros, params))

  def update(grads, state, params=None):
    del params
    count = state.count + 1
    f32 = lambda x: x.astype(jnp.float32)
    mu = jax.tree.map(lambda m, g: b1 * f32(m) + (1 - b1) * f32(g), state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), state.nu, grads)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    updates = jax.tree.map(lambda m, v, g: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype),
                           mu, nu, grads)
    cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)
    return updates, ScaleByAdamState(count, cast(mu), cast(nu))

  return optax.GradientTransformation(init, update)


def decay_mask(params):
  """True for parameters that get weight decay: everything but norm scales and biases."""

  def wants_decay(path, _):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", None))
    if name == "value" and len(path) > 1:  # nnx Variable nodes: the name is one level up
      last = path[-2]
      name = getattr(last, "key", getattr(last, "name", None))
    return name not in NO_DECAY_NAMES

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """Global-norm clipping -> Adam (moments in cfg.moment_dtype) -> decoupled weight decay -> -lr."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm > 0 else optax.identity(),
      scale_by_adam(cfg.b1, cfg.b2, cfg.eps, cfg.moment_dtype),
      optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(lr_schedule(cfg)),
  )
