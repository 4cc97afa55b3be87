"""The training objective: float32 cross-entropy, MTP and balance terms reported separately;
every parameter receives gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.transformer import create_model, router_bias_update
from deepseek_jax.train.loss import cross_entropy, loss_fn


def _batch(b=4, t=32, seed=0, vocab=128):
  seq = jax.random.randint(jax.random.key(seed), (b, t + 1), 0, vocab)
  mask = jnp.ones((b, t)).at[0, 20:].set(0.0)  # some padding
  return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": mask}


def test_cross_entropy_matches_numpy_log_softmax_with_mask():
  logits = jax.random.normal(jax.random.key(1), (2, 3, 7), jnp.bfloat16)
  targets = jnp.array([[1, 2, 3], [4, 5, 6]])
  mask = jnp.array([[1, 1, 0], [1, 0, 1]])
  total, count = cross_entropy(logits, targets, mask)
  x = np.asarray(logits, np.float64)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  want = -sum(logp[b, t, targets[b, t]] for b in range(2) for t in range(3) if mask[b, t])
  assert total.dtype == jnp.float32 and float(count) == 4
  assert float(total) == pytest.approx(want, rel=1e-5)


def test_total_is_ce_plus_weighted_mtp_plus_balance_terms(make_model):
  model = make_model(expert_balance_coef=0.01, device_balance_coef=0.02, comm_balance_coef=0.03)
  total, m = jax.jit(loss_fn)(model, _batch())
  cfg = model.config
  assert float(m["mtp_loss"]) == pytest.approx(
      cfg.mtp_loss_weight / cfg.n_mtp_modules * float(m["mtp_ce_1"]), rel=1e-6)
  balance = sum(float(m[k]) for k in ("expert_balance", "device_balance", "comm_balance"))
  assert balance > 0
  assert float(total) == pytest.approx(float(m["ce"]) + float(m["mtp_loss"]) + balance, rel=1e-6)
  assert float(m["ce"]) == pytest.approx(np.log(128), rel=0.1)  # untrained: near uniform
  assert m["expert_load"].shape == (cfg.n_moe_layers + cfg.n_mtp_modules, cfg.n_routed_experts)
  real_tokens = float(_batch()["mask"].sum())
  np.testing.assert_allclose(m["expert_load"][:cfg.n_moe_layers].sum(-1),
                             real_tokens * cfg.n_activated_experts)
  assert float(m["dropped_fraction"]) == 0.0  # dropless


def test_mtp_weight_override_scales_only_the_mtp_term(make_model):
  model = make_model()
  _, a = jax.jit(loss_fn)(model, _batch())
  _, b = jax.jit(loss_fn)(model, _batch(), mtp_weight=jnp.float32(0.1))
  assert float(b["mtp_loss"]) == pytest.approx(float(a["mtp_loss"]) / 3, rel=1e-5)
  assert float(b["ce"]) == float(a["ce"])


def test_every_parameter_receives_gradient(make_model):
  model = make_model(init_std=0.1, expert_balance_coef=0.01, device_balance_coef=0.01,
                     comm_balance_coef=0.01)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def grads(params):
    return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), _batch())[0])(params)

  g = grads(params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
    name = jax.tree_util.keystr(path)
    assert bool(jnp.isfinite(leaf).all()), name
    assert float(jnp.abs(leaf).max()) > 0, f"no gradient reaches {name}"
  experts = g["moe_layers"]["ffn"]["w_gate"][...]  # [layers, E, D, F]: every expert, every layer
  assert bool((jnp.abs(experts).max(axis=(2, 3)) > 0).all())


def test_router_bias_update_uses_the_reported_loads():
  model = create_model(ModelConfig.preset("tiny"))  # own copy: this test mutates state
  _, m = jax.jit(loss_fn)(model, _batch())
  load = m["expert_load"]
  router_bias_update(model, load, 0.01)
  bias = model.moe_layers.ffn.router_bias[...]
  n = model.config.n_moe_layers
  expected = 0.01 * jnp.sign(load[:n].mean(-1, keepdims=True) - load[:n])
  np.testing.assert_allclose(bias, expected)
  np.testing.assert_allclose(model.mtp[0].block.ffn.router_bias[...],
                             0.01 * jnp.sign(load[n].mean() - load[n]))
