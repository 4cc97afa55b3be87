"""The train step takes its objective: a loss written outside train/step.py (here an SFT-style
answer-only loss with per-sequence normalisation, the form GRPO's 1/|o_i| takes) runs through
the same jitted, sharded, accumulating step, MoE post-step included."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax.config import ModelConfig
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.parallel.partitioning import get_rules
from deepseek_jax.train.loss import PretrainLoss, cross_entropy, token_log_probs
from deepseek_jax.train.moe_step import BALANCE_TERMS, finish_moe_metrics, moe_metrics
from deepseek_jax.train.optimizer import piecewise_constant
from deepseek_jax.train.step import StepOptions, init_train_state, jit_train_step

CFG = ModelConfig.preset("tiny", n_mtp_modules=0, init_std=0.1)


@dataclasses.dataclass(frozen=True)
class AnswerOnlyLoss:
  """sum_i w_i (1/|answer_i|) sum_t CE_t over answer tokens / #sequences, plus the balance terms;
  w [B] is a per-sequence weight (the shape GRPO's advantages take)."""

  def normalizers(self, batch, n_micro):
    answers = batch["mask"].sum(-1)
    return {"sequences": jnp.maximum((answers > 0).sum(), 1).astype(jnp.float32),
            "balance": jnp.float32(1.0 / n_micro)}

  def __call__(self, model, batch, *, normalizers, step):
    out = model(batch["inputs"])
    nll = -token_log_probs(out.logits, batch["targets"])
    length = jnp.maximum(batch["mask"].sum(-1), 1.0)
    per_sequence = (nll * batch["mask"]).sum(-1) / length
    loss = (batch["weight"] * per_sequence).sum() / normalizers["sequences"]
    moe = moe_metrics(out.moe_stats, normalizers["balance"])
    total = loss + sum(moe[t] for t in BALANCE_TERMS)
    return total, dict(moe, loss=total, answer_loss=loss)

  def finish(self, metrics, *, step, n_micro):
    return finish_moe_metrics(metrics, n_micro)


def _batch():
  seq = jax.random.randint(jax.random.key(3), (8, 17), 0, CFG.vocab_size)
  mask = np.zeros((8, 16), np.float32)
  for row in range(8):
    mask[row, 4 + row:] = 1.0  # answers of different lengths after a prompt
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": jnp.asarray(mask),
          "weight": 1.0 + jnp.arange(8, dtype=jnp.float32) / 8}


def _run(loss, grad_accum, mesh_shape=dict(data=2)):
  n = int(np.prod(list(mesh_shape.values())))
  mesh, rules = make_mesh(mesh_shape, jax.devices()[:n]), get_rules("fsdp")
  tx = optax.sgd(0.1)
  graphdef, state, sh = init_train_state(CFG, tx, mesh, rules, seed=0)
  before = jax.device_get(state.model_state)
  options = StepOptions(grad_accum=grad_accum, router_bias_rate=piecewise_constant(((0, 0.01),)))
  step = jit_train_step(CFG, graphdef, tx, options, sh, mesh, rules, loss=loss)
  state, metrics = step(state, _batch())
  return jax.device_get((state, metrics)), before


def test_a_custom_loss_runs_through_the_step_with_accumulation_and_the_bias_update():
  (state1, m1), before = _run(AnswerOnlyLoss(), grad_accum=1)
  (state2, m2), _ = _run(AnswerOnlyLoss(), grad_accum=2)
  assert float(m1["answer_loss"]) > 0
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)  # accumulation = full batch
  np.testing.assert_allclose(m2["dropped_fraction"], m1["dropped_fraction"])
  for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # the MoE post-step ran: router biases moved by +-gamma from the global load
  bias_before = jax.tree.leaves(before)[0]
  bias_after = jax.tree.leaves(state1.model_state)[0]
  assert float(m1["router_bias_rate"]) == np.float32(0.01)
  np.testing.assert_allclose(np.abs(bias_after - bias_before).max(), 0.01, rtol=1e-5)


def test_the_custom_loss_value_is_the_hand_computed_objective():
  from deepseek_jax.model.transformer import create_model
  model = create_model(CFG, 0)
  batch = _batch()
  total, m = AnswerOnlyLoss()(model, batch, normalizers=AnswerOnlyLoss().normalizers(batch, 1),
                              step=jnp.int32(0))
  logits = np.asarray(model(batch["inputs"]).logits, np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  mask, targets = np.asarray(batch["mask"]), np.asarray(batch["targets"])
  weight = np.asarray(batch["weight"])
  want = np.mean([-weight[b] * sum(logp[b, t, targets[b, t]] for t in range(16) if mask[b, t])
                  / mask[b].sum() for b in range(8)])
  np.testing.assert_allclose(float(m["answer_loss"]), want, rtol=1e-5)


def test_the_pretraining_loss_is_one_such_loss():
  (_, m_default), _ = _run(None, grad_accum=1)
  (_, m_explicit), _ = _run(PretrainLoss(CFG.n_mtp_modules), grad_accum=1)
  np.testing.assert_array_equal(m_default["loss"], m_explicit["loss"])
  with pytest.raises(ValueError, match="PretrainLoss\\(n_mtp_modules=1\\) for a model with "
                                       "n_mtp_modules=0"):
    _run(PretrainLoss(1), grad_accum=1)


def test_token_log_probs_is_a_float32_log_softmax():
  logits = jnp.log(jnp.array([[[1.0, 3.0]]], jnp.bfloat16))
  got = token_log_probs(logits, jnp.array([[1]]))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np.log(0.75), rtol=1e-2)
  total, count = cross_entropy(logits, jnp.array([[1]]), jnp.ones((1, 1)))
  np.testing.assert_allclose(total, -got[0, 0])
  assert float(count) == 1


def test_a_loss_that_drops_the_moe_metrics_is_refused_instead_of_silently_not_balancing():
  class NoMoeMetrics(AnswerOnlyLoss):
    def __call__(self, model, batch, *, normalizers, step):
      total, metrics = super().__call__(model, batch, normalizers=normalizers, step=step)
      return total, {"loss": total}

    def finish(self, metrics, *, step, n_micro):
      return metrics

  with pytest.raises(ValueError, match="no expert_load: merge moe_metrics"):
    _run(NoMoeMetrics(), grad_accum=1)
