"""Training objective: next-token cross-entropy + MTP + MoE balance terms, each reported.

    total = CE + (lambda / D) sum_k CE_k^MTP + sum_layers (expert + device + comm balance)

Cross-entropy uses a float32 log-softmax and is averaged over unmasked targets. A batch is a
dict of [B, T] arrays: ``inputs``, ``targets`` (targets[i] = inputs[i + 1]), ``mask`` (1 where
the target counts) and optionally ``segment_ids`` / ``positions`` for packed rows and
``token_mask`` (1 for real input tokens) for MoE load statistics and capacity; it defaults to
``segment_ids > 0`` for packed rows, else to ``mask``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from deepseek_jax.model.mtp import mtp_targets

BALANCE_TERMS = ("expert_balance", "device_balance", "comm_balance")


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """(sum of -log p(target) over unmasked positions, number of unmasked positions)."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  return ((log_z - target_logit) * mask).sum(), mask.sum()


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
  inputs, targets = batch["inputs"], batch["targets"]
  mask = batch.get("mask", jnp.ones_like(targets)).astype(jnp.float32)
  segment_ids, positions = batch.get("segment_ids"), batch.get("positions")
  token_mask = batch.get("token_mask")
  if token_mask is None:
    token_mask = mask if segment_ids is None else (segment_ids > 0).astype(jnp.float32)
  norm = batch_normalizers(batch, cfg.n_mtp_modules) if normalizers is None else normalizers
  out = model(inputs, positions=positions, segment_ids=segment_ids, mask=token_mask)
  ce = cross_entropy(out.logits, targets, mask)[0] / norm.ce
  metrics = {"ce": ce, "tokens": mask.sum()}

  stats = [out.moe_stats] if out.moe_stats is not None else []
  mtp_total = jnp.zeros((), jnp.float32)
  if cfg.n_mtp_modules:
    lam = cfg.mtp_loss_weight if mtp_weight is None else mtp_weight
    for k, mtp in enumerate(model.mtp_forward(out.hidden, targets, mask, positions=positions,
                                              segment_ids=segment_ids), start=1):
      ce_k = cross_entropy(mtp.logits, mtp.targets, mtp.mask)[0] / norm.mtp[k - 1]
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
      metrics[term] = stats[term].sum() * norm.balance
      total = total + metrics[term]
    metrics["expert_load"] = stats["load"]  # [layers, E]: feed to router_bias_update
    metrics["dropped"] = stats["dropped"].sum()
    metrics["assignments"] = stats["assignments"].sum()
    metrics["dropped_fraction"] = metrics["dropped"] / jnp.maximum(metrics["assignments"], 1)
    metrics["overflow"] = stats["overflow"].sum()  # expert-parallel buffer overflow (slots)
    for key in ("dispatch_per_token", "remote_per_token"):  # expert parallelism: rows/token
      if key in stats:
        metrics[key] = stats[key].mean()
  metrics["mtp_loss"] = mtp_total
  metrics["loss"] = total
  return total, metrics
