"""Speculative decoding with the MTP modules (deepseek_jax/inference/speculative.py): greedy
output equal to plain decoding token for token, sampled output with the target model's exact
distribution (a chi-square test on a tiny vocabulary), caches equal to a recomputation from the
accepted tokens after rejections, and the switch's checks."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import stats

from deepseek_jax.config import ModelConfig
from deepseek_jax.inference import speculative
from deepseek_jax.inference.generate import SamplingConfig, generate, sampling_logits
from deepseek_jax.model.attention import CacheView
from deepseek_jax.model.transformer import create_model, forward, init_cache, init_mtp_caches
from deepseek_jax.train.loss import loss_fn

PROMPTS = [[5, 17, 9, 3, 42, 8, 61], [7], [12, 4, 33, 90, 2]]


@pytest.fixture(scope="module")
def random_model():
  """Untrained: its MTP drafts are mostly rejected (the rejection and rollback paths)."""
  return create_model(ModelConfig.preset("tiny", n_mtp_modules=2, init_std=0.1), seed=1)


@pytest.fixture(scope="module")
def trained_model():
  """Trained for a few seconds on arithmetic sequences (start + step * i mod 32, step 1 or 2):
  main model and both MTP modules predict them, so most drafts are accepted."""
  cfg = ModelConfig.preset("tiny", n_mtp_modules=2, vocab_size=32)
  graphdef, params, rest = nnx.split(create_model(cfg, seed=0), nnx.Param, ...)
  tx = optax.adam(1e-2)
  rng = np.random.default_rng(0)

  @jax.jit
  def update(params, opt, batch):
    grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch)[0])(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  opt = tx.init(params)
  for _ in range(60):
    seq = (rng.integers(0, 32, (16, 1)) + rng.integers(1, 3, (16, 1)) * np.arange(33)) % 32
    batch = {"inputs": jnp.asarray(seq[:, :-1]), "targets": jnp.asarray(seq[:, 1:]),
             "mask": jnp.ones((16, 32))}
    params, opt = update(params, opt, batch)
  return nnx.merge(graphdef, params, rest)


@pytest.mark.parametrize("depth", [1, 2])
def test_greedy_speculative_equals_plain_decoding_when_drafts_are_rejected(random_model, depth):
  plain = generate(random_model, PROMPTS, max_new_tokens=24, stop_tokens=[77])
  spec = generate(random_model, PROMPTS, max_new_tokens=24, stop_tokens=[77],
                  speculative="mtp", draft_depth=depth)
  np.testing.assert_array_equal(spec.tokens, plain.tokens)
  np.testing.assert_array_equal(spec.lengths, plain.lengths)
  assert spec.drafted.shape == (3, depth) and plain.drafted is None
  rate = np.asarray(spec.acceptance_rate())
  assert rate[0] < 0.5  # mostly rejected: the rollback path ran


@pytest.mark.parametrize("depth", [1, 2])
def test_greedy_speculative_equals_plain_decoding_with_accepted_drafts_and_stops(trained_model,
                                                                                depth):
  prompts = [[3, 5, 7], [1, 2], [10, 12, 14, 16, 18, 20], [9]]
  stopped = 0
  for stop, kind in (([], "latent"), ([25], "latent"), ([4], "latent"), ([4], "expanded")):
    plain = generate(trained_model, prompts, max_new_tokens=20, stop_tokens=stop)
    spec = generate(trained_model, prompts, max_new_tokens=20, stop_tokens=stop,
                    speculative="mtp", draft_depth=depth, cache_kind=kind)
    np.testing.assert_array_equal(spec.tokens, plain.tokens, err_msg=f"stop {stop}, {kind}")
    np.testing.assert_array_equal(spec.lengths, plain.lengths, err_msg=f"stop {stop}, {kind}")
    stopped += int((np.asarray(plain.lengths) < 20).sum())
    # every accepted draft is an output token (the first token comes from the prefill)
    assert (np.asarray(spec.accepted).sum(1) <= np.asarray(spec.lengths) - 1).all()
  assert stopped >= 3  # rows did stop early
  rate = np.asarray(spec.acceptance_rate())
  assert rate.shape == (depth,) and rate.min() > 0.6
  # fewer model steps than tokens: each step emitted up to depth + 1 tokens
  steps = np.asarray(spec.drafted)[:, 0]
  assert (steps < np.asarray(spec.lengths)).all()


@pytest.mark.parametrize("depth, sampling", [(2, SamplingConfig()), (3, SamplingConfig()),
                                             (3, SamplingConfig(temperature=1.5))],
                         ids=["depth_2", "depth_3", "depth_3_sampled"])
def test_caches_after_rejections_equal_a_recomputation_from_the_accepted_tokens(depth,
                                                                               sampling):
  """Rollback: every main-cache slot before a row's pending position, and every MTP_k cache
  slot whose input token t_{j+k} was accepted (j <= pos - k), equal a fresh prefill of the
  accepted tokens. A 1-token prompt with K = 3 takes the clamped window start."""
  model = create_model(ModelConfig.preset("tiny", n_mtp_modules=3, init_std=0.1), seed=1)
  tokens = jnp.asarray([[5, 17, 9, 3, 42, 8, 61], [7, 0, 0, 0, 0, 0, 0]])
  lengths = jnp.asarray([7, 1])
  out, state = speculative.speculative_generate(
      model, tokens, lengths, jax.random.key(0), jnp.asarray([], jnp.int32), max_new_tokens=19,
      sampling=sampling, cache_kind="latent", absorb=True, pad_id=0,
      return_log_probs=False, depth=depth, return_state=True)
  assert np.asarray(out.accepted).sum() < np.asarray(out.drafted).sum()  # there were rejections
  for row in range(2):
    pos = int(state["pos"][row])
    seq = state["seq"][row:row + 1, :pos + 1]  # accepted tokens, the pending one at pos
    slots = state["cache"].moe.c_kv.shape[2]
    fresh = model(seq[:, :pos], cache=init_cache(model.config, 1, slots),
                  cache_index=jnp.zeros(1, jnp.int32), absorb=True)
    for got, want in zip(jax.tree.leaves(state["cache"]), jax.tree.leaves(fresh.cache)):
      np.testing.assert_allclose(got[:, row, :pos], want[:, 0, :pos], atol=2e-5)
    h = fresh.hidden
    positions = jnp.arange(pos)[None]
    for k, cache in enumerate(state["mtp_caches"], start=1):
      emb = model.embed(jnp.pad(seq[:, k:], ((0, 0), (0, k - 1))))
      h, want = model.mtp[k - 1].decode(h, emb, positions, absorb=True,
                                        cache=init_mtp_caches(model.config, 1, slots)[0],
                                        cache_index=jnp.zeros(1, jnp.int32))
      valid = pos - k + 1  # entries j <= pos - k read accepted tokens only
      for got, ref in zip(jax.tree.leaves(cache), jax.tree.leaves(want)):
        np.testing.assert_allclose(got[:, row, :valid], ref[:, 0, :valid], atol=2e-5,
                                   err_msg=f"row {row}, MTP module {k}")


def _exact_distribution(model, prompt, n, sampling):
  """P(x_1 .. x_n | prompt) for every sequence, from one forward pass over all of them."""
  vocab = model.config.vocab_size
  seqs = np.array(list(itertools.product(range(vocab), repeat=n)))
  full = jnp.asarray(np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], 1))
  logits = forward(model, full).logits[:, len(prompt) - 1:-1]
  log_p = jax.nn.log_softmax(sampling_logits(logits, sampling), -1)
  joint = np.exp(np.take_along_axis(np.asarray(log_p, np.float64), seqs[..., None], -1)
                 [..., 0].sum(1))
  return seqs, joint / joint.sum()


@pytest.mark.parametrize("sampling, depth", [
    (SamplingConfig(temperature=1.0), 2), (SamplingConfig(temperature=0.8, top_k=3), 2),
    (SamplingConfig(temperature=1.0), 1), (SamplingConfig(temperature=1.2, top_p=0.8), 1)],
    ids=["temperature_1_depth_2", "top_k_3_depth_2", "temperature_1_depth_1",
         "top_p_depth_1"])
def test_sampled_speculative_output_has_the_target_models_distribution(sampling, depth):
  """Chi-square of 3-token continuations from 6,000 rows against the exact joint
  distribution. Drafts are accepted only part of the time, so the acceptance rule and the
  residual resampling both shape the output; with depth 1 an all-accepted step also emits the
  bonus token from p_K inside the 3 tokens. Accepting every draft, skipping the residual or
  drawing the bonus from the wrong distribution each fail this test (checked by planting
  them)."""
  cfg = ModelConfig.preset("tiny", vocab_size=5, n_mtp_modules=2, init_std=0.5,
                           yarn_factor=1.0)
  model = create_model(cfg, seed=4)
  prompt, n, rows = [1, 3], 3, 6000
  seqs, exact = _exact_distribution(model, prompt, n, sampling)
  out = generate(model, [prompt] * rows, max_new_tokens=n, sampling=sampling,
                 rng=jax.random.key(11), speculative="mtp", draft_depth=depth)
  assert (np.asarray(out.lengths) == n).all()
  rate = np.asarray(out.acceptance_rate())
  assert 0.1 < rate[0] < 0.9, rate  # both paths exercised
  index = {tuple(s): i for i, s in enumerate(seqs)}
  counts = np.bincount([index[tuple(r)] for r in np.asarray(out.tokens)], minlength=len(seqs))
  expected = exact * rows
  assert counts[expected == 0].sum() == 0  # nothing outside top-k is ever produced
  big = expected >= 5  # pool the rare sequences into one cell (if there are any)
  rare = ~big & (expected > 0)
  observed, want = counts[big], expected[big]
  if rare.any():
    observed, want = np.append(observed, counts[rare].sum()), np.append(want, expected[rare].sum())
  p_value = stats.chisquare(observed, want * observed.sum() / want.sum()).pvalue
  assert p_value > 1e-3, p_value
  # the reference itself: its first-token marginal is the target's next-token distribution
  first = jax.nn.softmax(sampling_logits(forward(model, jnp.asarray([prompt])).logits[0, -1],
                                         sampling))
  assert np.abs(np.asarray(first) - exact.reshape((5,) * n).sum((1, 2))).max() < 1e-5


def test_speculative_log_probs_are_the_targets_and_greedy_sampling_configs_agree(random_model):
  sampling = SamplingConfig(temperature=1.2, top_p=0.9)
  out = generate(random_model, PROMPTS, max_new_tokens=10, sampling=sampling,
                 rng=jax.random.key(3), return_log_probs=True, speculative="mtp")
  tokens, lengths, log_probs = (np.asarray(a) for a in (out.tokens, out.lengths, out.log_probs))
  for row, prompt in enumerate(PROMPTS):
    n = int(lengths[row])
    full = jnp.asarray([list(prompt) + tokens[row, :n].tolist()])
    logits = forward(random_model, full).logits[0, len(prompt) - 1:len(prompt) - 1 + n]
    want = np.take_along_axis(np.asarray(jax.nn.log_softmax(sampling_logits(logits, sampling))),
                              tokens[row, :n, None], -1)[:, 0]
    np.testing.assert_allclose(log_probs[row, :n], want, atol=1e-5)
    assert (log_probs[row, n:] == 0).all()


def test_the_switch_is_checked(random_model, make_model):
  with pytest.raises(ValueError, match="has none \\(n_mtp_modules=0\\)"):
    generate(make_model(n_mtp_modules=0), PROMPTS, max_new_tokens=4, speculative="mtp")
  with pytest.raises(ValueError, match="speculative must be None or 'mtp', got 'eagle'"):
    generate(random_model, PROMPTS, max_new_tokens=4, speculative="eagle")
  for depth in (0, 3):
    with pytest.raises(ValueError, match=r"draft_depth must lie in \[1, n_mtp_modules=2\]"):
      generate(random_model, PROMPTS, max_new_tokens=4, speculative="mtp", draft_depth=depth)
  for bad in (1.5, True):
    with pytest.raises(ValueError, match="draft_depth must be an integer"):
      generate(random_model, PROMPTS, max_new_tokens=4, speculative="mtp", draft_depth=bad)
  with pytest.raises(ValueError, match="draft_depth is for speculative='mtp'"):
    generate(random_model, PROMPTS, max_new_tokens=4, draft_depth=1)


def test_greedy_speculative_equals_plain_decoding_on_the_small_preset():
  model = create_model(ModelConfig.preset("small"), seed=2)  # one MTP module, 18M parameters
  prompts = [[1, 72, 101, 108, 108, 111], [1, 77], [1, 81, 58, 32, 87, 104, 101, 114, 101]]
  plain = generate(model, prompts, max_new_tokens=16)
  spec = generate(model, prompts, max_new_tokens=16, speculative="mtp")
  np.testing.assert_array_equal(spec.tokens, plain.tokens)
  np.testing.assert_array_equal(spec.lengths, plain.lengths)
