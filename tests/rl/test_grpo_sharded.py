"""The GRPO step under the pretraining mesh and logical-axis rules (8 fake CPU devices) equals
the single-device step: the same jit_train_step, only the loss differs."""

import jax
import numpy as np
import optax
import pytest

from deepseek_jax.config import ModelConfig
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.parallel.partitioning import batch_sharding, get_rules
from deepseek_jax.rl.advantages import group_advantages
from deepseek_jax.rl.losses import GRPOLoss
from deepseek_jax.train.optimizer import piecewise_constant
from deepseek_jax.train.step import StepOptions, init_train_state, jit_train_step

CFG = ModelConfig.preset("tiny", init_std=0.1)


def _batch():
  rng = np.random.default_rng(0)
  seq = rng.integers(3, CFG.vocab_size, (8, 25)).astype(np.int32)
  mask = np.zeros((8, 24), np.float32)
  for row, start in enumerate([6, 7, 8, 5, 6, 9, 7, 6]):
    mask[row, start:start + 10 + row] = 1.0  # ragged completions after the prompt
  rewards = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float32)  # 2 prompts x G = 4
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": mask,
          "old_log_probs": (-3.0 + 0.2 * rng.normal(size=(8, 24))).astype(np.float32),
          "ref_log_probs": (-3.0 + 0.2 * rng.normal(size=(8, 24))).astype(np.float32),
          "advantages": np.asarray(group_advantages(rewards, 4))}


def _step(mesh_shape, rules_name):
  n = int(np.prod(list(mesh_shape.values())))
  mesh, rules = make_mesh(mesh_shape, jax.devices()[:n]), get_rules(rules_name)
  tx = optax.sgd(0.1)  # linear in the gradient: weights differ exactly as gradients do
  graphdef, state, sh = init_train_state(CFG, tx, mesh, rules, seed=0)
  opts = StepOptions(router_bias_rate=piecewise_constant(((0, 0.01),)))
  step = jit_train_step(CFG, graphdef, tx, opts, sh, mesh, rules,
                        loss=GRPOLoss(beta=0.04, epsilon_high=0.28))
  state, metrics = step(state, jax.device_put(_batch(), batch_sharding(mesh, rules)))
  return jax.device_get((state.params, state.model_state, metrics))


@pytest.mark.parametrize("mesh_shape, rules", [
    (dict(data=2, fsdp=2, expert=2), "fsdp"), (dict(fsdp=2, expert=2, tensor=2), "fsdp")],
    ids=["data2-fsdp2-expert2", "fsdp2-expert2-tensor2"])
def test_the_sharded_grpo_step_equals_the_single_device_step(mesh_shape, rules):
  p1, b1, m1 = _step(dict(data=1), "fsdp")
  p2, b2, m2 = _step(mesh_shape, rules)
  for key in ("loss", "pg_loss", "kl", "clip_fraction", "entropy", "grad_norm"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=2e-5, atol=1e-7, err_msg=key)
  np.testing.assert_array_equal(m2["expert_load"], m1["expert_load"])
  for a, b in zip(jax.tree.leaves(b1), jax.tree.leaves(b2)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
