"""PPO's per-token credit assignment by hand, and the value model's state under a mesh."""

import jax
import numpy as np
import optax

from deepseek_jax.config import ModelConfig
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.parallel.partitioning import get_rules
from deepseek_jax.rl.ppo import abstract_value_state, init_value_state, ppo_advantages
from deepseek_jax.train.step import abstract_train_state, init_train_state


def _hand(rewards, mask, values, old, ref, kl_coef, gamma, lam):
  b, t = mask.shape
  adv, ret = np.zeros((b, t)), np.zeros((b, t))
  for i in range(b):
    idx = np.flatnonzero(mask[i])
    r = {j: -kl_coef * (old[i, j] - ref[i, j]) for j in idx}
    r[idx[-1]] += rewards[i]  # the rule reward on the last completion token
    running = 0.0
    for k in reversed(range(len(idx))):
      j = idx[k]
      v_next = values[i, idx[k + 1]] if k + 1 < len(idx) else 0.0
      delta = r[j] + gamma * v_next - values[i, j]
      running = delta + gamma * lam * running
      adv[i, j], ret[i, j] = running, running + values[i, j]
  m = mask > 0
  mu, sd = adv[m].mean(), adv[m].std()
  white = np.where(m, (adv - mu) / np.sqrt(sd ** 2 + 1e-8), 0.0)
  return white, ret


def test_ppo_advantages_are_kl_shaped_gae_whitened_by_hand():
  rng = np.random.default_rng(0)
  mask = np.zeros((3, 7), np.float32)
  mask[0, 2:6], mask[1, 1:7], mask[2, 3:5] = 1, 1, 1
  values = rng.normal(size=(3, 7)).astype(np.float32)
  old = rng.normal(-2, 0.3, size=(3, 7)).astype(np.float32)
  ref = rng.normal(-2, 0.3, size=(3, 7)).astype(np.float32)
  rewards = np.array([1.0, 0.0, 1.0], np.float32)
  adv, ret = ppo_advantages(rewards, mask, values, old, ref, kl_coef=0.1, gamma=0.99, lam=0.9,
                            whiten_advantages=True)
  want_adv, want_ret = _hand(rewards, mask, values, old, ref, 0.1, 0.99, 0.9)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret * mask, rtol=1e-5, atol=1e-6)


def test_the_value_model_is_sharded_like_the_policy_and_its_restore_target_matches():
  cfg = ModelConfig.preset("tiny", init_std=0.1)
  mesh, rules = make_mesh(dict(fsdp=4, expert=2)), get_rules("fsdp")
  tx = optax.adamw(1e-3)
  graphdef, policy, sh = init_train_state(cfg, tx, mesh, rules, seed=0)
  value_graphdef, value, value_sh = init_value_state(graphdef, policy, tx, mesh, rules)
  _, abstract_sh, abstract = abstract_value_state(graphdef, abstract_train_state(
      cfg, tx, mesh, rules)[2], tx, mesh, rules)
  assert jax.tree.structure(value) == jax.tree.structure(abstract)
  for x, a, s in zip(jax.tree.leaves(value), jax.tree.leaves(abstract),
                     jax.tree.leaves(abstract_sh)):
    assert x.shape == a.shape and x.dtype == a.dtype and x.sharding == s
  # The backbone is a copy of the policy's weights, sharded alike; the head starts at zero.
  for p, v in zip(jax.tree.leaves(policy.params), jax.tree.leaves(value.params["backbone"])):
    np.testing.assert_array_equal(p, v)
    assert p.sharding == v.sharding
  assert not np.any(value.params["value_head"][...])
