"""The GRPO learner: from a scored rollout to mu optimizer steps of the shared train step.

How one GRPO step works (DeepSeekMath §4.1, Algorithm 1; DeepSeek-R1 §2.2):

    1. the rollout (``rl/rollout.py``) samples G completions of each prompt from pi_theta;
       the loop scores them with the rule rewards (``rl/rewards.py``)
    2. ``prepare``: group-relative advantages (``advantages.group_advantages``: z-score,
       Dr. GRPO or RLOO), pi_old's log-probs of the sampled tokens (a forward pass of the
       rollout's parameters, or generate's own), and, when beta > 0, the frozen reference
       model's log-probs for the KL term
    3. ``update``: mu optimizer steps of ``GRPOLoss`` on that batch, pi_old held fixed: the
       same ``train.step.train_step`` as pretraining (sharding, gradient accumulation,
       clipping, AdamW, router-bias update), only the loss differs

No value model: the G completions of one prompt are each other's baseline. ``RLState`` is what
an RL checkpoint holds: the policy's TrainState, the reference weights (None when no term
needs them) and, for PPO (``rl/ppo.py``), the value model's TrainState.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.parallel.mesh import under_mesh
from deepseek_jax.rl.advantages import group_advantages
from deepseek_jax.rl.losses import GRPOLoss
from deepseek_jax.train.loss import token_log_probs
from deepseek_jax.train.step import StepOptions, TrainState, jit_train_step


class RLState(NamedTuple):
  """Everything an RL run updates and checkpoints: ``policy`` (TrainState), ``ref`` (the
  reference policy's (params, model_state), or None), ``value`` (PPO's value TrainState, or
  None). A pytree."""

  policy: TrainState
  ref: Optional[Any] = None
  value: Optional[TrainState] = None


def copy_weights(state: TrainState):
  """(params, model_state) copied out of ``state`` (a reference policy that later optimizer
  steps, which donate the state, leave untouched)."""
  return jax.tree.map(jnp.copy, (state.params, state.model_state))


def log_prob_fn(graphdef, mesh, temperature: float) -> Callable:
  """jit (params, model_state, batch) -> log p(targets) [B, T] float32 under logits /
  ``temperature`` (the distribution the rollout sampled from), 0 off the completion mask."""
  def fn(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    mask = batch["mask"].astype(jnp.float32)
    out = model(batch["inputs"], positions=batch.get("positions"),
                mask=batch.get("token_mask", mask))
    logits = out.logits.astype(jnp.float32) / temperature
    return token_log_probs(logits, batch["targets"]) * mask
  return under_mesh(jax.jit(fn), mesh)


class Learner:
  """The policy side shared by GRPO and PPO: pi_old / reference log-probs and the mu policy
  steps. ``put`` moves a host batch (numpy dict) onto the mesh, split over the batch axes."""

  def __init__(self, *, model_cfg, graphdef, shardings: TrainState, tx, options: StepOptions,
               mesh, rules, rl, loss: GRPOLoss, put: Callable[[dict], dict]):
    self.rl, self.loss, self.put = rl, loss, put
    self.step = jit_train_step(model_cfg, graphdef, tx, options, shardings, mesh, rules, loss)
    self.log_probs = log_prob_fn(graphdef, mesh, rl.temperature)

  def policy_log_probs(self, state: RLState, batch: dict) -> dict:
    """``old_log_probs`` (recomputed, or the rollout's) and ``ref_log_probs`` (when a
    reference is kept) added to the device batch."""
    if self.rl.recompute_old_log_probs:
      batch["old_log_probs"] = self.log_probs(state.policy.params, state.policy.model_state,
                                              batch)
    if state.ref is not None:
      batch["ref_log_probs"] = self.log_probs(*state.ref, batch)
    return batch

  def policy_steps(self, state: RLState, batch: dict):
    """mu optimizer steps on ``batch`` (pi_old fixed). Returns (state, metrics of each step:
    a list of device dicts)."""
    policy, history = state.policy, []
    for _ in range(self.rl.iterations):
      policy, metrics = self.step(policy, batch)
      history.append(metrics)
    return state._replace(policy=policy), history


def mean_metrics(history: list) -> dict:
  """Host mean of each scalar metric over the mu steps; ``finite`` whether every step's loss,
  gradient norm and updated state were finite (the NaN stop judges all of them)."""
  host = jax.device_get(history)
  out = {k: float(np.mean([h[k] for h in host])) for k, v in host[0].items() if np.ndim(v) == 0}
  for k, v in host[-1].items():
    if np.ndim(v):
      out[k] = np.asarray(v)
  out["finite"] = all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in host)
  out["state_finite"] = float(min(h.get("state_finite", 1.0) for h in host))
  return out


class GRPOLearner(Learner):
  """GRPO (module doc): ``prepare(state, host_batch, rewards)`` then ``update(state, batch)``."""

  @classmethod
  def create(cls, *, rl, **kwargs) -> "GRPOLearner":
    loss = GRPOLoss(beta=rl.beta, epsilon_low=rl.epsilon_low, epsilon_high=rl.epsilon_high,
                    kl_estimator=rl.kl_estimator, loss_aggregation=rl.loss_aggregation,
                    max_completion_length=rl.max_new_tokens, temperature=rl.temperature)
    return cls(rl=rl, loss=loss, **kwargs)

  @staticmethod
  def keeps_reference(rl) -> bool:
    return rl.get("beta", 0) > 0

  def prepare(self, state: RLState, host_batch: dict, rewards: np.ndarray) -> dict:
    """The device batch of one rollout: ``host_batch`` (``rollout.to_batch``) plus
    ``advantages`` [N] from ``rewards`` [N] (group order), pi_old and reference log-probs."""
    adv = group_advantages(jnp.asarray(rewards), self.rl.group_size, estimator=self.rl.advantage,
                           eps=self.rl.advantage_eps)
    batch = self.put(dict(host_batch, advantages=np.asarray(adv)))
    return self.policy_log_probs(state, batch)

  def update(self, state: RLState, batch: dict):
    """(state after mu policy steps, host metrics averaged over them; no ``kl`` without a
    reference model)."""
    state, history = self.policy_steps(state, batch)
    metrics = mean_metrics(history)
    if state.ref is None:
      metrics.pop("kl")
    return state, metrics

