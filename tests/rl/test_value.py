"""The PPO value model and its clipped loss: hand-computed values, zero initial values, and a
value model trained by the shared train step (router biases included) toward its returns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deepseek_jax.rl.value import ValueLoss, value_loss_per_token, value_model_from_policy
from deepseek_jax.train.step import StepOptions, TrainState, train_step


def test_clipped_value_loss_by_hand():
  v = np.array([1.0, 0.0, 2.0, -1.0], np.float32)
  old = np.array([0.5, 0.5, 0.5, 0.5], np.float32)
  ret = np.array([2.0, -1.0, 0.0, 0.5], np.float32)
  want = []
  for vi, oi, ri in zip(v, old, ret):
    clipped = oi + min(max(vi - oi, -0.2), 0.2)
    want.append(0.5 * max((vi - ri) ** 2, (clipped - ri) ** 2))
  np.testing.assert_allclose(value_loss_per_token(jnp.asarray(v), jnp.asarray(old),
                                                  jnp.asarray(ret), 0.2), want, rtol=1e-6)
  np.testing.assert_allclose(value_loss_per_token(jnp.asarray(v), jnp.asarray(old),
                                                  jnp.asarray(ret), 0.0), 0.5 * (v - ret) ** 2)
  with pytest.raises(ValueError, match="clip_range_value must be >= 0"):
    ValueLoss(clip_range_value=-1)


def test_the_value_model_starts_at_zero_copies_the_policy_and_learns_its_returns(make_model):
  policy = make_model()
  value = value_model_from_policy(policy)
  tokens = jax.random.randint(jax.random.key(0), (4, 10), 1, policy.config.vocab_size)
  values, _ = value(tokens)
  assert values.shape == (4, 10) and float(jnp.abs(values).max()) == 0.0
  embed = np.asarray(policy.embed.embedding[...])
  mask = (jnp.arange(10)[None] >= jnp.array([[3], [4], [5], [2]])).astype(jnp.float32)
  batch = {"inputs": tokens, "targets": tokens, "mask": mask,
           "returns": jnp.where(mask > 0, 1.5, 0.0), "old_values": jnp.zeros((4, 10))}
  graphdef, params, rest = nnx.split(value, nnx.Param, ...)
  tx = optax.adam(3e-2)
  state = TrainState(jnp.int32(0), params, rest, tx.init(params))
  step = jax.jit(lambda s, b: train_step(s, b, graphdef=graphdef, tx=tx, loss=ValueLoss(0.0),
                                         options=StepOptions(router_bias_rate=lambda _: 1e-3)))
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch)
    losses.append(float(metrics["value_loss"]))
  assert losses[0] == pytest.approx(0.5 * 1.5 ** 2, rel=1e-5)  # V = 0 everywhere at first
  assert losses[-1] < 0.1 * losses[0]
  assert "router_bias_rate" in metrics  # the backbone's router biases were updated
  np.testing.assert_array_equal(np.asarray(policy.embed.embedding[...]), embed)  # policy intact
