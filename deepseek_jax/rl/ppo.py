"""The PPO baseline learner (DeepSeekMath §4.1.1, InstructGPT): what GRPO removes.

One PPO step on a scored rollout (the same rollout and rewards as GRPO):

    1. ``prepare``: pi_old and reference log-probs of the sampled tokens; the value model's
       V(s_t) at every completion position; per-token rewards r_t = -kl_coef * KL_t plus the
       rule reward on the completion's last token (``advantages.token_rewards``, KL_t = log
       pi_old - log pi_ref, InstructGPT's per-token penalty); GAE(gamma, lambda) advantages and
       returns (``advantages.gae``), the advantages whitened over the batch's tokens
    2. ``update``: mu steps of the policy with the clipped surrogate on per-token advantages
       (``GRPOLoss`` with beta = 0, the KL being in the reward, and a token mean), and mu steps
       of the value model with the clipped value loss (``value.ValueLoss``) toward the returns,
       each through the shared ``train.step.train_step`` with its own optimizer state

The value model is a second copy of the policy's weights (plus a scalar head) with its own Adam
moments, sharded like the policy by the same logical-axis rules.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deepseek_jax.parallel.mesh import under_mesh
from deepseek_jax.parallel.partitioning import state_shardings, tree_shardings_like
from deepseek_jax.rl.advantages import gae, token_rewards, whiten
from deepseek_jax.rl.grpo import Learner, RLState, mean_metrics
from deepseek_jax.rl.losses import GRPOLoss
from deepseek_jax.rl.value import ValueLoss, ValueModel, value_model_from_policy
from deepseek_jax.train.step import StepOptions, TrainState, jit_train_step
from jax.sharding import NamedSharding, PartitionSpec


def _value_shardings(params, rest, tx, mesh, rules) -> TrainState:
  param_sh, rest_sh = state_shardings(params, mesh, rules), state_shardings(rest, mesh, rules)
  opt_sh = tree_shardings_like(jax.eval_shape(tx.init, params), params, param_sh, mesh)
  return TrainState(NamedSharding(mesh, PartitionSpec()), param_sh, rest_sh, opt_sh)


def init_value_state(policy_graphdef, policy: TrainState, tx: optax.GradientTransformation,
                     mesh, rules):
  """(graphdef, TrainState, shardings) of a value model initialised from the policy's current
  weights (``value.value_model_from_policy``: a copy, zero head) with a fresh optimizer state,
  placed in the shardings of the logical-axis ``rules``."""
  model = value_model_from_policy(nnx.merge(policy_graphdef, policy.params, policy.model_state))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  sh = _value_shardings(params, rest, tx, mesh, rules)
  params, rest = jax.device_put(params, sh.params), jax.device_put(rest, sh.model_state)
  opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
  return graphdef, TrainState(jax.device_put(jnp.int32(0), sh.step), params, rest, opt_state), sh


def abstract_value_state(policy_graphdef, policy_abstract: TrainState, tx, mesh, rules):
  """(graphdef, shardings, abstract TrainState) of the value model: a restore target."""
  def build():
    policy = nnx.merge(policy_graphdef, policy_abstract.params, policy_abstract.model_state)
    return ValueModel(policy)
  model = nnx.eval_shape(build)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  sh = _value_shardings(params, rest, tx, mesh, rules)
  abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, rest,
                        jax.eval_shape(tx.init, params))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, sh)
  return graphdef, sh, abstract


def value_fn(graphdef, mesh) -> Callable:
  """jit (params, model_state, batch) -> V [B, T] float32 (0 off the completion mask)."""
  def fn(params, rest, batch):
    mask = batch["mask"].astype(jnp.float32)
    values, _ = nnx.merge(graphdef, params, rest)(batch["inputs"],
                                                  positions=batch.get("positions"),
                                                  mask=batch.get("token_mask", mask))
    return values * mask
  return under_mesh(jax.jit(fn), mesh)


def ppo_advantages(rewards, mask, values, old_log_probs, ref_log_probs, *, kl_coef: float,
                   gamma: float, lam: float, whiten_advantages: bool):
  """(advantages [B, T], returns [B, T]) float32 of step 1 (module doc); ``ref_log_probs``
  None means no KL penalty. The per-token KL of the penalty is k1, log pi_old - log pi_ref."""
  kl = None if ref_log_probs is None else (old_log_probs - ref_log_probs)
  per_token = token_rewards(rewards, mask, kl, kl_coef)
  adv, returns = gae(per_token, values, mask, gamma=gamma, lam=lam)
  if whiten_advantages:
    adv = whiten(adv, mask)
  return adv, returns


class PPOLearner(Learner):
  """PPO with a value model (module doc). ``value_graphdef``/``value_shardings`` describe the
  value model's TrainState in ``RLState.value``; ``value_tx`` its optimizer."""

  def __init__(self, *, value_graphdef, value_shardings, value_tx, model_cfg, options, mesh,
               rules, rl, **kwargs):
    super().__init__(model_cfg=model_cfg, options=options, mesh=mesh, rules=rules, rl=rl,
                     **kwargs)
    self.value_step = jit_train_step(model_cfg, value_graphdef, value_tx,
                                     StepOptions(grad_accum=options.grad_accum,
                                                 router_bias_rate=options.router_bias_rate),
                                     value_shardings, mesh, rules,
                                     ValueLoss(rl.clip_range_value))
    self.values = value_fn(value_graphdef, mesh)
    self._advantages = jax.jit(ppo_advantages, static_argnames=(
        "kl_coef", "gamma", "lam", "whiten_advantages"))

  @classmethod
  def create(cls, *, rl, **kwargs) -> "PPOLearner":
    loss = GRPOLoss(beta=0.0, epsilon_low=rl.epsilon_low, epsilon_high=rl.epsilon_high,
                    loss_aggregation="token_mean", temperature=rl.temperature)
    return cls(rl=rl, loss=loss, **kwargs)

  @staticmethod
  def keeps_reference(rl) -> bool:
    return rl.get("kl_coef", 0) > 0

  def prepare(self, state: RLState, host_batch: dict, rewards: np.ndarray) -> dict:
    """The device batch: ``host_batch`` plus old/ref log-probs, ``old_values``, per-token
    ``advantages`` and ``returns`` [N, T]."""
    batch = self.put(dict(host_batch, sequence_rewards=np.asarray(rewards, np.float32)))
    batch = self.policy_log_probs(state, batch)
    batch["old_values"] = self.values(state.value.params, state.value.model_state, batch)
    batch["advantages"], batch["returns"] = self._advantages(
        batch.pop("sequence_rewards"), batch["mask"], batch["old_values"],
        batch["old_log_probs"], batch.get("ref_log_probs"), kl_coef=float(self.rl.kl_coef),
        gamma=float(self.rl.gamma), lam=float(self.rl.lam),
        whiten_advantages=bool(self.rl.whiten_advantages))
    return batch  # ref_log_probs stays for the KL metric; the loss has beta = 0

  def update(self, state: RLState, batch: dict):
    """(state after mu policy and mu value steps, host metrics: the policy's, and the value
    model's as ``value_loss``, ``value_mean``, ``value_clip_fraction``, ``value_grad_norm``)."""
    state, history = self.policy_steps(state, batch)
    value, value_history = state.value, []
    for _ in range(self.rl.iterations):
      value, m = self.value_step(value, batch)
      value_history.append(m)
    metrics = mean_metrics(history)
    metrics.pop("kl")  # beta = 0 in the loss; the penalty's KL is the one to report
    if "ref_log_probs" in batch:
      mask = batch["mask"]
      metrics["kl"] = float(((batch["old_log_probs"] - batch["ref_log_probs"]) * mask).sum()
                            / jnp.maximum(mask.sum(), 1.0))
    vm = mean_metrics(value_history)
    metrics.update({k: vm[k] for k in ("value_loss", "value_mean", "value_clip_fraction")},
                   value_grad_norm=vm["grad_norm"], finite=metrics["finite"] and vm["finite"],
                   state_finite=min(metrics["state_finite"], vm["state_finite"]))
    return state._replace(value=value), metrics
