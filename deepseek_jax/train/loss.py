"""Training objective: next-token cross-entropy + MTP + MoE balance terms, each reported.

    total = CE + (lambda / D) sum_k CE_k^MTP + sum_layers (expert + device + comm balance)

Cross-entropy uses a float32 log-softmax and is averaged over unmasked targets. A batch is a
dict of [B, T] arrays: ``inputs``, ``targets`` (targets[i] = inputs[i + 1]), ``mask`` (1 where
the target counts) and optionally ``segment_ids`` / ``positions`` for packed rows and
``token_mask`` (1 for real input tokens) for MoE load statistics and capacity; it defaults to
``segment_ids > 0`` for packed rows, else to ``mask``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

BALANCE_TERMS = ("expert_balance", "device_balance", "comm_balance")


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """(sum of -log p(target) over unmasked positions, number of unmasked positions)."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  return ((log_z - target_logit) * mask).sum(), mask.sum()


def _mean_ce(logits, targets, mask) -> jax.Array:
  total, count = cross_entropy(logits, targets, mask)
  return total / jnp.maximum(count, 1.0)


def loss_fn(model, batch: dict, *, mtp_weight: Optional[jax.Array] = None):
  """Returns (total loss, metrics). ``mtp_weight`` overrides config.mtp_loss_weight (schedules)."""
  cfg = model.config
  inputs, targets = batch["inputs"], batch["targets"]
  mask = batch.get("mask", jnp.ones_like(targets)).astype(jnp.float32)
  segment_ids, positions = batch.get("segment_ids"), batch.get("positions")
  token_mask = batch.get("token_mask")
  if token_mask is None:
    token_mask = mask if segment_ids is None else (segment_ids > 0).astype(jnp.float32)
  out = model(inputs, positions=positions, segment_ids=segment_ids, mask=token_mask)
  ce = _mean_ce(out.logits, targets, mask)
  metrics = {"ce": ce, "tokens": mask.sum()}

  stats = [out.moe_stats] if out.moe_stats is not None else []
  mtp_total = jnp.zeros((), jnp.float32)
  if cfg.n_mtp_modules:
    lam = cfg.mtp_loss_weight if mtp_weight is None else mtp_weight
    for k, mtp in enumerate(model.mtp_forward(out.hidden, targets, mask, positions=positions,
                                              segment_ids=segment_ids), start=1):
      ce_k = _mean_ce(mtp.logits, mtp.targets, mtp.mask)
      metrics[f"mtp_ce_{k}"] = ce_k
      mtp_total = mtp_total + ce_k
      if mtp.moe_stats is not None:
        stats.append(jax.tree.map(lambda a: a[None], mtp.moe_stats))
    metrics["mtp_ce"] = mtp_total / cfg.n_mtp_modules
    mtp_total = lam / cfg.n_mtp_modules * mtp_total

  total = ce + mtp_total
  if stats:  # MoE layers of the main stack, then those inside MTP modules
    stats = jax.tree.map(lambda *a: jnp.concatenate(a), *stats)
    for term in BALANCE_TERMS:
      metrics[term] = stats[term].sum()
      total = total + metrics[term]
    metrics["expert_load"] = stats["load"]  # [layers, E]: feed to router_bias_update
    metrics["dropped_fraction"] = stats["dropped"].sum() / jnp.maximum(stats["assignments"].sum(), 1)
  metrics["mtp_loss"] = mtp_total
  metrics["loss"] = total
  return total, metrics
