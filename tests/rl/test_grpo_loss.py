"""The GRPO loss against a NumPy transcription of DeepSeekMath eq. 3 for every switch (aggregation,
clip-higher, KL estimator, beta), masking, finite differences, and GRPOLoss inside the shared
train step (additive over micro-batches)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax.rl.losses import GRPOLoss, aggregate, grpo_token_terms, kl_per_token

B, T = 4, 6
RNG = np.random.default_rng(0)
LOGP = np.log(RNG.uniform(0.05, 0.95, (B, T))).astype(np.float32)
OLD = (LOGP + RNG.normal(0, 0.3, (B, T))).astype(np.float32)  # ratios well outside 1 +- 0.2
REF = (LOGP + RNG.normal(0, 0.5, (B, T))).astype(np.float32)
ADV = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
MASK = np.array([[0, 1, 1, 1, 0, 0],   # completion tokens only; ragged lengths 3, 5, 1, 2
                 [0, 1, 1, 1, 1, 1],
                 [0, 0, 0, 0, 1, 0],
                 [0, 0, 1, 1, 0, 0]], np.float32)


def _numpy_loss(logp, old, ref, adv, mask, *, beta, eps_low, eps_high, estimator, how, L=0):
  """DeepSeekMath eq. 3 written out token by token."""
  total, seqs, toks = 0.0, 0, 0
  per_seq = []
  for i in range(B):
    terms = []
    for t in range(T):
      if not mask[i, t]:
        continue
      rho = np.exp(logp[i, t] - old[i, t])
      surrogate = min(rho * adv[i], np.clip(rho, 1 - eps_low, 1 + eps_high) * adv[i])
      lr = logp[i, t] - ref[i, t]
      kl = {"k1": lr, "k2": 0.5 * lr * lr, "k3": np.exp(-lr) + lr - 1}[estimator]
      terms.append(-(surrogate - beta * kl))
    if terms:
      seqs += 1
      toks += len(terms)
      per_seq.append(sum(terms) / len(terms))
      total += sum(terms)
  if how == "seq_mean_token_mean":
    return sum(per_seq) / seqs
  if how == "token_mean":
    return total / toks
  return total / (seqs * L)


@pytest.mark.parametrize("how,estimator,beta,eps", [
    *itertools.product(["seq_mean_token_mean", "token_mean", "constant_length"],
                       ["k1", "k2", "k3"], [0.0, 0.04], [(0.2, 0.2), (0.2, 0.28)])])
def test_every_variant_equals_the_hand_computed_loss(how, estimator, beta, eps):
  terms = grpo_token_terms(jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(ADV),
                           jnp.asarray(MASK), ref_log_probs=jnp.asarray(REF), beta=beta,
                           epsilon_low=eps[0], epsilon_high=eps[1], kl_estimator=estimator)
  got = aggregate(terms["loss"], jnp.asarray(MASK), how, sequences=4.0, tokens=MASK.sum(),
                  max_completion_length=8)
  want = _numpy_loss(LOGP, OLD, REF, ADV, MASK, beta=beta, eps_low=eps[0], eps_high=eps[1],
                     estimator=estimator, how=how, L=8)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_k3_is_nonnegative_and_zero_only_at_equal_policies():
  lp = jnp.linspace(-3, 0, 7)
  assert float(kl_per_token(lp, lp).max()) == 0.0
  assert bool((kl_per_token(lp, lp + 0.3) > 0).all())
  np.testing.assert_allclose(kl_per_token(lp, lp - 0.5, "k1"), 0.5, rtol=1e-6)


def test_masked_tokens_contribute_nothing_whatever_they_hold():
  garbage = np.where(MASK > 0, 0.0, 1e4).astype(np.float32)  # exp(1e4) would be inf
  f = lambda logp, old, ref: aggregate(  # noqa: E731
      grpo_token_terms(logp, old, jnp.asarray(ADV), jnp.asarray(MASK), ref_log_probs=ref,
                       beta=0.04)["loss"], jnp.asarray(MASK), "seq_mean_token_mean",
      sequences=4.0, tokens=MASK.sum())
  clean = f(jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(REF))
  dirty = f(jnp.asarray(LOGP), jnp.asarray(OLD + garbage), jnp.asarray(REF - garbage))
  assert float(clean) == float(dirty)
  grad = jax.grad(f)(jnp.asarray(LOGP), jnp.asarray(OLD + garbage), jnp.asarray(REF - garbage))
  assert bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad * (1 - MASK)).max()) == 0.0


def test_equal_rewards_give_zero_policy_loss_and_no_nan():
  terms = grpo_token_terms(jnp.asarray(LOGP), jnp.asarray(OLD), jnp.zeros(B), jnp.asarray(MASK))
  assert float(jnp.abs(terms["loss"]).max()) == 0.0


def test_the_gradient_equals_finite_differences():
  def f(logp):
    terms = grpo_token_terms(logp, jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK),
                             ref_log_probs=jnp.asarray(REF), beta=0.04, epsilon_high=0.28)
    return aggregate(terms["loss"], jnp.asarray(MASK), "seq_mean_token_mean", sequences=4.0,
                     tokens=MASK.sum())

  x = jnp.asarray(LOGP, jnp.float32)
  grad = np.asarray(jax.grad(f)(x))
  eps = 1e-3
  for i, t in zip(*np.nonzero(MASK)):
    e = np.zeros((B, T), np.float32)
    e[i, t] = eps
    fd = (float(f(x + e)) - float(f(x - e))) / (2 * eps)
    np.testing.assert_allclose(grad[i, t], fd, rtol=2e-2, atol=2e-4)


def _rl_batch(cfg, rng):
  k = jax.random.split(rng, 4)
  tokens = jax.random.randint(k[0], (4, 13), 1, cfg.vocab_size)
  mask = (jnp.arange(12)[None] >= jnp.array([[5], [6], [7], [4]])).astype(jnp.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask,
          "old_log_probs": -2.0 + 0.1 * jax.random.normal(k[1], (4, 12)),
          "ref_log_probs": -2.0 + 0.1 * jax.random.normal(k[2], (4, 12)),
          "advantages": jnp.array([1.0, -1.0, 0.7, -0.7])}


def test_grpo_runs_in_the_shared_train_step_and_micro_batches_add_up(make_model):
  from flax import nnx
  from deepseek_jax.train.step import StepOptions, TrainState, train_step

  model = make_model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.sgd(1e-2)
  state = TrainState(jnp.int32(0), params, rest, tx.init(params))
  batch = _rl_batch(model.config, jax.random.key(0))
  loss = GRPOLoss(beta=0.04, epsilon_high=0.28)
  outs = {}
  for n in (1, 2):
    new, metrics = jax.jit(lambda s, b, n=n: train_step(
        s, b, graphdef=graphdef, tx=tx, loss=loss, options=StepOptions(grad_accum=n)))(state, batch)
    outs[n] = (new, metrics)
  for key in ("loss", "pg_loss", "kl", "clip_fraction", "entropy", "response_length"):
    np.testing.assert_allclose(outs[1][1][key], outs[2][1][key], rtol=2e-5, atol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(outs[1][0].params), jax.tree.leaves(outs[2][0].params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert float(outs[1][1]["response_length"]) == pytest.approx(float(batch["mask"].sum()) / 4)
  assert float(outs[1][1]["state_finite"]) == 1.0


def test_bad_switches_are_refused_naming_them():
  with pytest.raises(ValueError, match="loss_aggregation must be one of"):
    GRPOLoss(loss_aggregation="mean")
  with pytest.raises(ValueError, match="kl_estimator must be one of"):
    GRPOLoss(kl_estimator="k4")
  with pytest.raises(ValueError, match="needs max_completion_length"):
    GRPOLoss(loss_aggregation="constant_length")
  with pytest.raises(ValueError, match="beta > 0 needs ref_log_probs"):
    grpo_token_terms(jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK),
                     beta=0.1)
