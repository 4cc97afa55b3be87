"""The GRPO objective and its common variants, as a ``train.loss.Loss`` for the shared step.

DeepSeekMath §4.1 (eq. 3) / DeepSeek-R1 §2.2.1, per prompt q with G sampled outputs o_i:

    J = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_it, clip(rho_it, 1 - eps_low, 1 + eps_high) A_it)
                                  - beta D_KL,t ]
    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | ...)       (per token)
    D_KL,t (k3) = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1   (unbiased, >= 0)

and the loss is -J. Switches (each a field of ``GRPOLoss``, so each is an ablation):

    loss_aggregation  "seq_mean_token_mean"  1/N_seq sum_i 1/|o_i| sum_t   (GRPO)
                      "token_mean"           1/sum_i |o_i| sum_i sum_t     (DAPO, arXiv 2503.14476)
                      "constant_length"      1/(N_seq L) sum_i sum_t, L = max_completion_length
                                                                           (Dr. GRPO, 2503.20783)
    epsilon_low / epsilon_high               clip-higher (DAPO: 0.2 / 0.28)
    kl_estimator      "k1" log(pi_theta/pi_ref), "k2" 1/2 log^2(...), "k3" (default; Schulman 2020)
    beta              0: no KL term, and no reference log-probs are needed

The advantages come with the batch (``rl/advantages.py``: group z-score, Dr. GRPO, RLOO), per
sequence [B] or per token [B, T]. Every normaliser is computed on the whole global batch, so
micro-batches add up exactly (gradient accumulation). A batch (rows = prompt + completion):

    inputs, targets [B, T] int32   targets[t] = inputs[t + 1]
    mask            [B, T]         1 where targets[t] is a completion token (the loss's tokens)
    token_mask      [B, T]         optional: 1 on every real input token (MoE load statistics)
    old_log_probs   [B, T] f32     log pi_old(targets[t]) (the rollout's, or recomputed)
    ref_log_probs   [B, T] f32     log pi_ref(targets[t]) (only when beta > 0)
    advantages      [B] or [B, T] f32
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax.train.loss import token_log_probs
from deepseek_jax.train.moe_step import add_moe_terms, finish_moe_metrics

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "constant_length")
KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_per_token(log_probs: jax.Array, ref_log_probs: jax.Array, estimator: str = "k3"):
  """Per-token estimate of KL(pi_theta || pi_ref) from the sampled tokens' log-probs (float32,
  any shape): k1 = log r', k2 = (log r')^2 / 2, k3 = exp(-log r') + log r' - 1 with
  log r' = log pi_theta - log pi_ref (Schulman, "Approximating KL divergence", 2020; k3 is
  DeepSeekMath eq. 4). Raises ValueError for an unknown estimator."""
  log_ratio = log_probs.astype(jnp.float32) - ref_log_probs.astype(jnp.float32)
  if estimator == "k1":
    return log_ratio
  if estimator == "k2":
    return 0.5 * log_ratio ** 2
  if estimator == "k3":
    return jnp.exp(-log_ratio) + log_ratio - 1.0
  raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


class GRPONormalizers(NamedTuple):
  """Global-batch divisors (see the module doc): ``sequences`` (rows with >= 1 completion
  token), ``tokens`` (completion tokens), ``balance`` (1 / micro-batches, for MoE terms)."""

  sequences: jax.Array
  tokens: jax.Array
  balance: jax.Array


def grpo_token_terms(log_probs, old_log_probs, advantages, mask, *, ref_log_probs=None,
                     beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                     kl_estimator: str = "k3") -> dict:
  """The per-token pieces of the GRPO loss, float32 [B, T] (masked positions are 0):
  ``loss`` = -(min(rho A, clip(rho) A) - beta KL), ``surrogate``, ``kl``, ``clipped`` (1 where
  the clipped branch is the minimum and differs), ``ratio``. ``advantages`` [B] or [B, T]."""
  mask = mask.astype(jnp.float32)
  real = mask > 0
  adv = advantages.astype(jnp.float32)
  adv = jnp.where(real, adv[:, None] if adv.ndim == 1 else adv, 0.0)
  log_probs = log_probs.astype(jnp.float32)
  # Masked positions never reach the result, gradients included, whatever they hold.
  log_ratio = jnp.where(real, log_probs - old_log_probs.astype(jnp.float32), 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
  surrogate = jnp.minimum(unclipped, clipped)
  kl = jnp.zeros_like(surrogate)
  if beta:
    if ref_log_probs is None:
      raise ValueError("beta > 0 needs ref_log_probs in the batch (a reference model)")
    ref = jnp.where(real, ref_log_probs.astype(jnp.float32), log_probs)
    kl = jnp.where(real, kl_per_token(log_probs, ref, kl_estimator), 0.0)
  zero = lambda x: jnp.where(real, x, 0.0)  # noqa: E731
  return {"loss": zero(-(surrogate - beta * kl)), "surrogate": zero(surrogate), "kl": kl,
          "clipped": zero((clipped < unclipped).astype(jnp.float32)), "ratio": zero(ratio)}


def aggregate(per_token: jax.Array, mask: jax.Array, how: str, *, sequences, tokens,
              max_completion_length: int = 0) -> jax.Array:
  """Sum of ``per_token`` [B, T] reduced as ``how`` (module doc), with the global-batch
  ``sequences`` / ``tokens`` counts. Raises ValueError for an unknown aggregation."""
  mask = mask.astype(jnp.float32)
  if how == "seq_mean_token_mean":
    per_seq = per_token.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    return per_seq.sum() / sequences
  if how == "token_mean":
    return per_token.sum() / tokens
  if how == "constant_length":
    if max_completion_length < 1:
      raise ValueError("loss_aggregation='constant_length' needs max_completion_length >= 1")
    return per_token.sum() / (sequences * max_completion_length)
  raise ValueError(f"loss_aggregation must be one of {AGGREGATIONS}, got {how!r}")


@dataclasses.dataclass(frozen=True)
class GRPOLoss:
  """GRPO (and DAPO / Dr. GRPO variants) as a ``train.loss.Loss``; see the module doc.

  Metrics (additive, then finished): ``loss``, ``pg_loss`` (the aggregated -surrogate),
  ``kl`` and ``clip_fraction`` and ``ratio`` (token means), ``entropy`` (token mean of the
  policy's entropy, nats), ``response_length`` (mean completion tokens per sequence),
  ``tokens``, and the MoE balance terms / expert load. ``temperature``: the rollout's; the
  policy's log-probs are those of logits / temperature, the distribution the completions were
  sampled from (TRL's convention; old and reference log-probs must be tempered alike). Raises
  ValueError on construction for an unknown aggregation or estimator, a negative beta or
  epsilon, a temperature <= 0.
  """

  beta: float = 0.04
  epsilon_low: float = 0.2
  epsilon_high: float = 0.2
  kl_estimator: str = "k3"
  loss_aggregation: str = "seq_mean_token_mean"
  max_completion_length: int = 0
  temperature: float = 1.0

  def __post_init__(self):
    if self.loss_aggregation not in AGGREGATIONS:
      raise ValueError(f"loss_aggregation must be one of {AGGREGATIONS}, got "
                       f"{self.loss_aggregation!r}")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
    if self.beta < 0 or self.epsilon_low < 0 or self.epsilon_high < 0:
      raise ValueError(f"beta, epsilon_low and epsilon_high must be >= 0, got {self.beta}, "
                       f"{self.epsilon_low}, {self.epsilon_high}")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 (the rollout's), got {self.temperature}")
    if self.loss_aggregation == "constant_length" and self.max_completion_length < 1:
      raise ValueError("loss_aggregation='constant_length' (Dr. GRPO) needs "
                       "max_completion_length >= 1")

  def normalizers(self, batch: dict, n_micro: int) -> GRPONormalizers:
    mask = batch["mask"].astype(jnp.float32)
    return GRPONormalizers(jnp.maximum((mask.sum(-1) > 0).sum().astype(jnp.float32), 1.0),
                           jnp.maximum(mask.sum(), 1.0), jnp.float32(1.0 / n_micro))

  def __call__(self, model, batch: dict, *, normalizers: GRPONormalizers, step: jax.Array):
    del step
    mask = batch["mask"].astype(jnp.float32)
    token_mask = batch.get("token_mask", mask)
    out = model(batch["inputs"], positions=batch.get("positions"), mask=token_mask)
    logits = out.logits.astype(jnp.float32) / self.temperature
    log_probs = token_log_probs(logits, batch["targets"])
    terms = grpo_token_terms(log_probs, batch["old_log_probs"], batch["advantages"], mask,
                             ref_log_probs=batch.get("ref_log_probs"), beta=self.beta,
                             epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                             kl_estimator=self.kl_estimator)
    norm = normalizers
    agg = dict(how=self.loss_aggregation, sequences=norm.sequences, tokens=norm.tokens,
               max_completion_length=self.max_completion_length)
    total = aggregate(terms["loss"], mask, **agg)
    entropy = -(jax.nn.softmax(logits) * jax.nn.log_softmax(logits)).sum(-1)
    metrics = {"pg_loss": aggregate(-terms["surrogate"], mask, **agg),
               "kl": terms["kl"].sum() / norm.tokens,
               "clip_fraction": terms["clipped"].sum() / norm.tokens,
               "ratio": terms["ratio"].sum() / norm.tokens,
               "entropy": (entropy * mask).sum() / norm.tokens,
               "response_length": mask.sum() / norm.sequences,
               "tokens": mask.sum()}
    total, metrics = add_moe_terms(total, metrics, out.moe_stats, norm.balance)
    metrics["loss"] = total
    return total, metrics

  def finish(self, metrics: dict, *, step: jax.Array, n_micro: int) -> dict:
    del step
    return finish_moe_metrics(metrics, n_micro)
