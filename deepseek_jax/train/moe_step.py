"""The MoE side of every train step, in one place: metric reductions and the router-bias update.

Any step (pretraining, SFT, GRPO/PPO, a pipeline stage) that runs MoE layers calls these three:

    metrics.update(moe_metrics(out.moe_stats, balance_scale))   # inside the loss, per micro-batch
    metrics = finish_moe_metrics(metrics, n_micro)               # after accumulation
    model_state, metrics = router_bias_post_step(graphdef, params, model_state, metrics, gamma)

Inside the loss every MoE metric is additive over micro-batches (sums, or means already divided
by the number of micro-batches); ``finish_moe_metrics`` derives the ratios from the sums, so
accumulation gives the full batch's values. The bias update (V3 §2.1.2) reads the expert load
summed over the whole global batch: micro-batches, devices and processes.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model.moe import RouterBias
from deepseek_jax.model.transformer import router_bias_update

BALANCE_TERMS = ("expert_balance", "device_balance", "comm_balance")
PER_TOKEN = ("dispatch_per_token", "remote_per_token")  # expert parallelism: rows per token


def moe_metrics(stats: dict, balance_scale=1.0) -> dict:
  """Metrics of one forward's MoE statistics.

  ``stats``: each entry stacked over MoE layers (main stack first, then MTP modules), as
  ``ModelOutput.moe_stats``. ``balance_scale`` multiplies the balance terms (1 / micro-batches
  under accumulation, see ``loss.Normalizers``). Returns the three balance terms (summed over
  layers; add them to the loss), ``expert_load`` [layers, E] (feed to the bias update),
  ``dropped``, ``assignments``, ``dropped_fraction``, ``overflow`` and, under expert
  parallelism, the per-token dispatch rows (means over layers).
  """
  metrics = {term: stats[term].sum() * balance_scale for term in BALANCE_TERMS}
  metrics["expert_load"] = stats["load"]
  metrics["dropped"] = stats["dropped"].sum()
  metrics["assignments"] = stats["assignments"].sum()
  metrics["dropped_fraction"] = metrics["dropped"] / jnp.maximum(metrics["assignments"], 1)
  metrics["overflow"] = stats["overflow"].sum()  # expert-parallel buffer overflow (slots)
  for key in PER_TOKEN:
    if key in stats:
      metrics[key] = stats[key].mean()
  return metrics


def add_moe_terms(total: jax.Array, metrics: dict, stats: Optional[dict],
                  balance_scale=1.0) -> tuple[jax.Array, dict]:
  """(total + the balance terms, metrics + ``moe_metrics``) for a forward's ``moe_stats``; both
  unchanged for a model without MoE layers (``stats`` None). The one line every loss needs."""
  if stats is None:
    return total, metrics
  moe = moe_metrics(stats, balance_scale)
  for term in BALANCE_TERMS:
    total = total + moe[term]
  return total, {**metrics, **moe}


def finish_moe_metrics(metrics: dict, n_micro: int) -> dict:
  """The ratios and means of metrics summed over ``n_micro`` micro-batches (a no-op for one)."""
  metrics = dict(metrics)
  if "assignments" in metrics:
    metrics["dropped_fraction"] = metrics["dropped"] / jnp.maximum(metrics["assignments"], 1)
  for key in PER_TOKEN:
    if key in metrics:
      metrics[key] = metrics[key] / n_micro
  return metrics


def router_bias_post_step(graphdef, params, model_state, metrics: dict,
                          gamma: Optional[jax.Array]):
  """Apply the auxiliary-loss-free bias update b_i += gamma sign(mean load - load_i) from the
  step's global ``metrics["expert_load"]``. Returns (new model_state, metrics with
  ``router_bias_rate``); both unchanged when gamma is None, the state unchanged when the model
  has no router bias. Raises
  ValueError when the model has router biases but ``metrics`` has no ``expert_load`` (a loss
  that forgot ``moe_metrics`` would otherwise silently stop balancing)."""
  if gamma is None:
    return model_state, metrics
  model = nnx.merge(graphdef, params, model_state)
  if "expert_load" not in metrics:
    if any(isinstance(v, RouterBias) for _, v in nnx.iter_graph(model)):
      raise ValueError("the model has router biases but the loss's metrics hold no "
                       "expert_load: merge moe_metrics(out.moe_stats) into them (train/moe_step.py)"
                       ", or pass StepOptions(router_bias_rate=None)")
    return model_state, metrics
  # A wrapper around the decoder (the PPO value model) keeps it as ``backbone``.
  router_bias_update(getattr(model, "backbone", model), metrics["expert_load"], gamma)
  _, _, model_state = nnx.split(model, nnx.Param, ...)
  return model_state, dict(metrics, router_bias_rate=gamma)
