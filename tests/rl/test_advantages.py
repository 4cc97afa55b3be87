"""Advantages: group-relative estimators, GAE, masked whitening, per-token PPO rewards, each
against a hand-written NumPy / Python reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.rl.advantages import gae, group_advantages, token_rewards, whiten

# Two groups of G = 4: one mixed, one with all-equal rewards (0.1 is not exact in float32, so a
# float mean of the group need not equal its members).
REWARDS = np.array([1.0, 0.0, 0.5, 1.0, 0.1, 0.1, 0.1, 0.1], np.float32)


def _numpy_reference(rewards, g, estimator, eps=1e-4):
  out = np.zeros(len(rewards))
  r = rewards.astype(np.float64)
  for start in range(0, len(r), g):
    group = r[start:start + g]
    for i in range(g):
      if estimator == "grpo":
        out[start + i] = (group[i] - group.mean()) / (group.std(ddof=0) + eps)
      elif estimator == "drgrpo":
        out[start + i] = group[i] - group.mean()
      else:  # leave-one-out baseline, computed literally
        out[start + i] = group[i] - np.delete(group, i).mean()
  return out


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_group_advantages_match_the_numpy_reference(estimator):
  adv = group_advantages(jnp.asarray(REWARDS), 4, estimator=estimator)
  assert adv.dtype == jnp.float32 and adv.shape == (8,)
  expected = _numpy_reference(REWARDS, 4, estimator)
  np.testing.assert_allclose(np.asarray(adv)[:4], expected[:4], rtol=1e-5, atol=1e-6)
  # the all-equal group: exactly zero, no NaN
  assert np.all(np.asarray(adv)[4:] == 0.0)


def test_group_advantages_hand_computed_grpo_values():
  # group [1, 0, 0.5, 1]: mean 0.625, population std sqrt(0.171875) = 0.414578...
  std = np.sqrt(((np.array([1, 0, 0.5, 1]) - 0.625) ** 2).mean())
  assert std == pytest.approx(0.4145781)
  adv = np.asarray(group_advantages(REWARDS, 4, eps=0.0))
  np.testing.assert_allclose(adv[:4], (np.array([1, 0, 0.5, 1]) - 0.625) / std, rtol=1e-6)
  rloo = np.asarray(group_advantages(REWARDS, 4, estimator="rloo"))
  assert rloo[1] == pytest.approx(0.0 - (1.0 + 0.5 + 1.0) / 3)


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_group_advantages_keep_a_b_by_g_shape_and_sum_to_zero(estimator):
  rewards = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
  adv = group_advantages(rewards, 5, estimator=estimator)
  assert adv.shape == (3, 5)
  np.testing.assert_allclose(adv, group_advantages(rewards.reshape(-1), 5, estimator=estimator)
                             .reshape(3, 5), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(adv).sum(axis=1), 0.0, atol=1e-5)


def test_group_advantages_constant_groups_are_exactly_zero_for_any_eps_and_under_jit():
  rewards = jnp.array([[0.1] * 3, [-7.3] * 3, [1e30] * 3], jnp.float32)
  for estimator in ("grpo", "drgrpo", "rloo"):
    for eps in (0.0, 1e-4):
      adv = jax.jit(group_advantages, static_argnums=1, static_argnames="estimator")(
          rewards, 3, estimator=estimator, eps=eps)
      assert np.all(np.asarray(adv) == 0.0)


def test_group_advantages_refuse_bad_arguments():
  with pytest.raises(ValueError, match="group_size must be an int >= 2"):
    group_advantages(REWARDS, 1)
  with pytest.raises(ValueError, match="8 rewards are not a whole number of groups of 3"):
    group_advantages(REWARDS, 3)
  with pytest.raises(ValueError, match="G = 4, but group_size = 2"):
    group_advantages(REWARDS.reshape(2, 4), 2)
  with pytest.raises(ValueError, match=r"unknown estimator 'ppo'.*'grpo', 'drgrpo', 'rloo'"):
    group_advantages(REWARDS, 4, estimator="ppo")
  with pytest.raises(ValueError, match=r"\[B \* G\] or \[B, G\]"):
    group_advantages(REWARDS.reshape(2, 2, 2), 2)


def _gae_loop(rewards, values, mask, gamma, lam):
  """The convention written out: V_T bootstraps (m_T = 1), padding gets 0 and cuts the chain."""
  b, t = rewards.shape
  if values.shape[1] == t:
    values = np.concatenate([values, np.zeros((b, 1))], axis=1)
  m = np.concatenate([mask, np.ones((b, 1))], axis=1)
  adv, ret = np.zeros((b, t)), np.zeros((b, t))
  for i in range(b):
    running = 0.0
    for j in reversed(range(t)):
      if not m[i, j]:
        running = 0.0
        continue
      delta = rewards[i, j] + gamma * values[i, j + 1] * m[i, j + 1] - values[i, j]
      running = delta + gamma * lam * running
      adv[i, j] = running
      ret[i, j] = running + values[i, j]
  return adv, ret


MASK = np.array([[1, 1, 1, 1, 1, 1],      # full row: the bootstrap value counts
                 [1, 1, 1, 0, 0, 0],      # ragged: ends after 3 tokens
                 [0, 0, 1, 1, 1, 0],      # prompt-masked start, padded end
                 [1, 1, 0, 1, 1, 0],      # a hole is an episode boundary
                 [0, 0, 0, 0, 0, 0]], np.float32)


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0),
                                        (0.5, 0.5)])
@pytest.mark.parametrize("bootstrap", [True, False])
def test_gae_matches_a_python_double_loop(gamma, lam, bootstrap):
  rng = np.random.default_rng(1)
  rewards = rng.normal(size=MASK.shape).astype(np.float32)
  values = rng.normal(size=(5, 7 if bootstrap else 6)).astype(np.float32)
  adv, ret = gae(rewards, values, MASK, gamma=gamma, lam=lam)
  assert adv.dtype == jnp.float32 and adv.shape == ret.shape == MASK.shape
  ref_adv, ref_ret = _gae_loop(rewards, values, MASK, gamma, lam)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(adv)[MASK == 0] == 0) and np.all(np.asarray(ret)[MASK == 0] == 0)


def test_gae_padding_does_not_leak_even_when_it_holds_nan():
  rewards = np.array([[1.0, 2.0, np.nan, np.nan]], np.float32)
  values = np.array([[0.5, 0.25, np.nan, np.nan, np.nan]], np.float32)
  mask = np.array([[1, 1, 0, 0]], np.float32)
  adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
  # last real token: delta = 2 - 0.25 (the next value is episode end = 0)
  d1 = 2.0 - 0.25
  d0 = 1.0 + 0.9 * 0.25 - 0.5
  np.testing.assert_allclose(adv, [[d0 + 0.9 * 0.8 * d1, d1, 0, 0]], rtol=1e-6)
  np.testing.assert_allclose(ret, [[d0 + 0.72 * d1 + 0.5, d1 + 0.25, 0, 0]], rtol=1e-6)


def test_gae_under_jit_and_refuses_bad_shapes():
  rewards, values = jnp.ones((2, 3)), jnp.zeros((2, 4))
  adv, _ = jax.jit(gae, static_argnames=("gamma", "lam"))(rewards, values, jnp.ones((2, 3)),
                                                          gamma=1.0, lam=1.0)
  np.testing.assert_allclose(adv, [[3, 2, 1], [3, 2, 1]])
  with pytest.raises(ValueError, match=r"values.*expected \(2, 4\)"):
    gae(rewards, jnp.zeros((2, 5)), jnp.ones((2, 3)), gamma=1.0, lam=1.0)
  with pytest.raises(ValueError, match=r"mask has shape \(2, 4\)"):
    gae(rewards, values, jnp.ones((2, 4)), gamma=1.0, lam=1.0)
  with pytest.raises(ValueError, match=r"rewards must be \[B, T\]"):
    gae(jnp.ones(3), values, jnp.ones(3), gamma=1.0, lam=1.0)


def test_whiten_uses_only_masked_in_entries():
  x = np.array([[1.0, 2.0, 3.0, 1e6], [4.0, np.nan, -5.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
  kept = np.array([1.0, 2.0, 3.0, 4.0])
  mu, var = kept.mean(), kept.var(ddof=0)
  out = np.asarray(whiten(x, mask))
  expected = np.zeros((2, 4))
  expected[mask == 1] = (kept - mu) / np.sqrt(var + 1e-8)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  assert out[mask == 1].mean() == pytest.approx(0.0, abs=1e-6)
  unshifted = np.asarray(whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(unshifted[mask == 1], expected[mask == 1] + mu, rtol=1e-6)
  assert np.all(unshifted[mask == 0] == 0)
  assert np.all(np.asarray(whiten(x, np.zeros_like(mask))) == 0)
  with pytest.raises(ValueError, match="mask shape"):
    whiten(x, mask[:, :3])


def test_token_rewards_put_the_sequence_reward_on_the_last_real_token():
  mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], np.float32)
  seq = np.array([1.0, -2.0, 3.0, 5.0], np.float32)
  out = np.asarray(token_rewards(seq, mask))
  np.testing.assert_array_equal(out, [[0, 0, 1, 0], [0, 0, 0, -2], [0, 0, 3, 0], [0, 0, 0, 0]])
  kl = np.arange(16, dtype=np.float32).reshape(4, 4)
  kl[3, 0] = np.nan  # padding's KL is ignored
  out = np.asarray(jax.jit(token_rewards)(seq, mask, kl, 0.1))
  np.testing.assert_allclose(out, [[0, -0.1, 1 - 0.2, 0], [0, -0.5, -0.6, -2 - 0.7],
                                   [-0.8, 0, 3 - 1.0, 0], [0, 0, 0, 0]], rtol=1e-6)
  with pytest.raises(ValueError, match=r"expected \(4,\)"):
    token_rewards(seq[:3], mask)
  with pytest.raises(ValueError, match=r"kl has shape"):
    token_rewards(seq, mask, kl[:, :3], 0.1)


def test_group_advantages_ddof_one_matches_the_sample_std():
  group = np.array([1, 0, 0.5, 1], np.float64)
  adv = np.asarray(group_advantages(REWARDS, 4, eps=0.0, ddof=1))
  np.testing.assert_allclose(adv[:4], (group - group.mean()) / group.std(ddof=1), rtol=1e-6)


def test_dynamic_sampling_keeps_only_groups_whose_rewards_differ():
  from deepseek_jax.rl.advantages import informative_groups
  rewards = [1, 1, 1, 0, 0, 0, 0, 1, 0.5, 0.5, 0.5, 0.5]
  np.testing.assert_array_equal(informative_groups(rewards, 4), [True, True, False])
