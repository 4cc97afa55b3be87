"""Training objective: next-token cross-entropy + MTP + MoE balance terms, each reported.

    total = CE + (lambda / D) sum_k CE_k^MTP + sum_layers (expert + device + comm balance)

Cross-entropy uses a float32 log-softmax and is averaged over unmasked targets. A batch is a
dict of [B, T] arrays: ``inputs``, ``targets`` (targets[i] = inputs[i + 1]), ``mask`` (1 where
the target counts) and optionally ``segment_ids`` / ``positions`` for packed rows and
``token_mask`` (1 for real input tokens) for MoE load statistics and capacity; it defaults to
``segment_ids > 0`` for packed rows, else to ``mask``.

The train step takes its objective as an argument (``train.step.train_step(..., loss=...)``):
any object with the ``Loss`` methods. ``PretrainLoss`` is this file's objective in that form;
SFT, GRPO or PPO losses supply their own normalisers and metrics and reuse the step as is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp

from deepseek_jax.model.mtp import mtp_targets
from deepseek_jax.train.moe_step import BALANCE_TERMS, finish_moe_metrics, moe_metrics


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) [B, T] float32 from logits [B, T, V] (a float32 log-softmax): the per-token
  quantity of CE, SFT and policy-gradient losses (GRPO's ratio pi_theta / pi_old)."""
  logits = logits.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logit - jax.nn.logsumexp(logits, axis=-1)


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """(sum of -log p(target) over unmasked positions, number of unmasked positions)."""
  mask = mask.astype(jnp.float32)
  return (-token_log_probs(logits, targets) * mask).sum(), mask.sum()


class Normalizers(NamedTuple):
  """Divisors that make every loss term additive over micro-batches (gradient accumulation):
  CE and each MTP depth divide by their token counts over the *whole* batch, and the balance
  terms (means over sequences) are scaled by 1 / number of micro-batches."""

  ce: jax.Array  # scalar
  mtp: jax.Array  # [D]
  balance: jax.Array  # scalar


def batch_normalizers(batch: dict, n_mtp_modules: int, n_micro: int = 1) -> Normalizers:
  targets = batch["targets"]
  mask = batch.get("mask", jnp.ones_like(targets)).astype(jnp.float32)
  mtp = [mtp_targets(targets, mask, batch.get("segment_ids"), k)[2].sum()
         for k in range(1, n_mtp_modules + 1)]
  return Normalizers(jnp.maximum(mask.sum(), 1.0),
                     jnp.maximum(jnp.stack(mtp), 1.0) if mtp else jnp.ones((0,)),
                     jnp.float32(1.0 / n_micro))


def loss_fn(model, batch: dict, *, mtp_weight: Optional[jax.Array] = None,
            normalizers: Optional[Normalizers] = None):
  """Returns (total loss, metrics). ``mtp_weight`` overrides config.mtp_loss_weight (schedules);
  ``normalizers`` default to this batch's own counts (see ``Normalizers``)."""
  cfg = model.config
  norm = batch_normalizers(batch, cfg.n_mtp_modules) if normalizers is None else normalizers
  inputs, _, _, segment_ids, positions, token_mask = batch_fields(batch)
  out = model(inputs, positions=positions, segment_ids=segment_ids, mask=token_mask)
  total, metrics, mtp_stats = head_loss(model, out.logits, out.hidden, batch, norm, mtp_weight)
  stats = [s for s in (out.moe_stats, mtp_stats) if s is not None]
  if stats:  # MoE layers of the main stack, then those inside MTP modules
    stats = jax.tree.map(lambda *a: jnp.concatenate(a), *stats)
    moe = moe_metrics(stats, norm.balance)
    for term in BALANCE_TERMS:
      total = total + moe[term]
    metrics.update(moe)
  metrics["loss"] = total
  return total, metrics


def batch_fields(batch: dict):
  """(inputs, targets, mask f32, segment_ids, positions, token_mask) of a training batch: the
  loss mask defaults to ones, the MoE token mask to the loss mask (or segment_ids > 0)."""
  inputs, targets = batch["inputs"], batch["targets"]
  mask = batch.get("mask", jnp.ones_like(targets)).astype(jnp.float32)
  segment_ids, positions = batch.get("segment_ids"), batch.get("positions")
  token_mask = batch.get("token_mask")
  if token_mask is None:
    token_mask = mask if segment_ids is None else (segment_ids > 0).astype(jnp.float32)
  return inputs, targets, mask, segment_ids, positions, token_mask


def head_loss(model, logits: jax.Array, hidden: jax.Array, batch: dict, norm: Normalizers,
              mtp_weight: Optional[jax.Array] = None):
  """The loss terms after the decoder stack: next-token CE of ``logits`` [B, T, V] and the MTP
  depths run from ``hidden`` [B, T, D] (V3 §2.2, eq. 24-25). Returns (CE + lambda/D sum CE_k,
  metrics, the MTP blocks' MoE stats stacked [D, ...] or None)."""
  cfg = model.config
  _, targets, mask, segment_ids, positions, _ = batch_fields(batch)
  ce = cross_entropy(logits, targets, mask)[0] / norm.ce
  metrics = {"ce": ce, "tokens": mask.sum()}
  stats = []
  mtp_total = jnp.zeros((), jnp.float32)
  if cfg.n_mtp_modules:
    lam = cfg.mtp_loss_weight if mtp_weight is None else mtp_weight
    for k, mtp in enumerate(model.mtp_forward(hidden, targets, mask, positions=positions,
                                              segment_ids=segment_ids), start=1):
      ce_k = cross_entropy(mtp.logits, mtp.targets, mtp.mask)[0] / norm.mtp[k - 1]
      metrics[f"mtp_ce_{k}"] = ce_k
      mtp_total = mtp_total + ce_k
      if mtp.moe_stats is not None:
        stats.append(jax.tree.map(lambda a: a[None], mtp.moe_stats))
    metrics["mtp_ce"] = mtp_total / cfg.n_mtp_modules
    mtp_total = lam / cfg.n_mtp_modules * mtp_total
  metrics["mtp_loss"] = mtp_total
  stats = jax.tree.map(lambda *a: jnp.concatenate(a), *stats) if stats else None
  return ce + mtp_total, metrics, stats


class Loss(Protocol):
  """An objective the train step can run (``train_step(..., loss=...)``).

  ``normalizers(batch, n_micro)`` is computed once on the whole global batch (token counts,
  sequence counts, ...) and handed to every micro-batch, so per-micro-batch losses add up to
  the full batch's loss. ``__call__(model, micro_batch, normalizers=, step=)`` returns
  (scalar loss, metrics); its metrics must be additive over micro-batches and, for a model with
  MoE layers, include ``moe_metrics(out.moe_stats, ...)`` (the balance terms to add to the
  loss and the ``expert_load`` the router-bias update reads). ``finish(metrics, step=,
  n_micro=)`` turns the summed metrics into the reported ones (ratios, schedules).

  A batch is a dict of arrays whose first dim is the global batch (tokens [B, T], per-sequence
  values such as advantages [B]); the step splits it over the mesh's batch axes and into
  micro-batches. ``experiments/train.py`` runs ``PretrainLoss``; another objective calls
  ``train.step.jit_train_step(..., loss=...)`` from its own loop (see
  ``tests/train/test_step_takes_its_loss.py``). ``token_log_probs`` gives per-token log p.
  """

  def normalizers(self, batch: dict, n_micro: int) -> Any: ...

  def __call__(self, model, batch: dict, *, normalizers: Any,
               step: jax.Array) -> tuple[jax.Array, dict]: ...

  def finish(self, metrics: dict, *, step: jax.Array, n_micro: int) -> dict: ...


@dataclasses.dataclass(frozen=True)
class PretrainLoss:
  """Next-token CE + MTP + MoE balance terms (``loss_fn``) as a ``Loss``.

  ``n_mtp_modules`` sizes the MTP normalisers; ``mtp_weight`` (step -> lambda, e.g. V3's 0.3
  then 0.1) overrides ``ModelConfig.mtp_loss_weight`` when given.
  """

  n_mtp_modules: int
  mtp_weight: Optional[Callable[[jax.Array], jax.Array]] = None

  def normalizers(self, batch: dict, n_micro: int) -> Normalizers:
    return batch_normalizers(batch, self.n_mtp_modules, n_micro)

  def __call__(self, model, batch: dict, *, normalizers: Normalizers, step: jax.Array):
    if model.config.n_mtp_modules != self.n_mtp_modules:
      raise ValueError(f"PretrainLoss(n_mtp_modules={self.n_mtp_modules}) for a model with "
                       f"n_mtp_modules={model.config.n_mtp_modules}; build it from the model's "
                       "config")
    lam = None if self.mtp_weight is None else self.mtp_weight(step)
    return loss_fn(model, batch, mtp_weight=lam, normalizers=normalizers)

  def finish(self, metrics: dict, *, step: jax.Array, n_micro: int) -> dict:
    metrics = finish_moe_metrics(metrics, n_micro)
    if self.mtp_weight is not None:
      metrics["mtp_weight"] = self.mtp_weight(step)
    return metrics
