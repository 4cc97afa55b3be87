"""generate(): prefill + compiled decode over the latent cache, variable-length batches, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.inference.generate import SamplingConfig, generate, sample_logits
from deepseek_jax.model.transformer import DeepSeekModel, forward

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 7, 1], [120, 4, 33, 90, 2]]


@pytest.fixture
def model(make_model):
  return make_model(init_std=0.1)


def _greedy_by_full_recompute(model, prompt, n):
  """Reference: re-run the whole sequence through the training forward for every token
  (right-padded to one length: attention is causal, so padding cannot change position len-1)."""
  seq = list(prompt)
  for _ in range(n):
    padded = jnp.array([seq + [0] * (16 - len(seq))])
    seq.append(int(jnp.argmax(forward(model, padded).logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_greedy_generation_matches_full_recompute_for_every_row(model):
  out = generate(model, PROMPTS, max_new_tokens=8)
  for row, prompt in enumerate(PROMPTS):
    assert out.tokens[row].tolist() == _greedy_by_full_recompute(model, prompt, 8), row
  np.testing.assert_array_equal(out.lengths, [8, 8, 8])


def test_batched_variable_length_prompts_equal_one_at_a_time(model):
  batched = generate(model, PROMPTS, max_new_tokens=6)
  for row, prompt in enumerate(PROMPTS):
    alone = generate(model, [prompt], max_new_tokens=6)
    np.testing.assert_array_equal(batched.tokens[row], alone.tokens[0])


def test_absorbed_latent_cache_and_expanded_cache_generate_the_same_tokens(model):
  latent = generate(model, PROMPTS, max_new_tokens=8)
  expanded = generate(model, PROMPTS, max_new_tokens=8, cache_kind="expanded")
  np.testing.assert_array_equal(latent.tokens, expanded.tokens)


def test_stop_tokens_end_rows_and_pad_the_rest(model):
  free = generate(model, PROMPTS, max_new_tokens=8).tokens
  stop = int(free[0, 2])  # row 0 emits it at step 2 (and maybe other rows too)
  out = generate(model, PROMPTS, max_new_tokens=8, stop_tokens=[stop], pad_id=0)
  for row in range(len(PROMPTS)):
    hits = np.flatnonzero(np.asarray(free[row]) == stop)
    n = int(hits[0]) + 1 if hits.size else 8
    assert int(out.lengths[row]) == n
    np.testing.assert_array_equal(out.tokens[row, :n], free[row, :n])
    assert (np.asarray(out.tokens[row, n:]) == 0).all()


def test_decode_loop_is_traced_once_not_per_token(model, monkeypatch):
  calls = []
  original = DeepSeekModel.__call__

  def counting(self, tokens, **kwargs):
    calls.append(tokens.shape)
    return original(self, tokens, **kwargs)

  monkeypatch.setattr(DeepSeekModel, "__call__", counting)
  generate(model, [[1, 2, 3, 4, 5, 6, 7, 8, 9]], max_new_tokens=12, prompt_bucket=16)
  assert len(calls) == 2  # one prefill trace + one decode-step trace for all 11 decode steps
  assert calls[1][1] == 1
  generate(model, [[9, 8, 7]], max_new_tokens=12, prompt_bucket=16)  # same bucket: no retrace
  assert len(calls) == 2


def test_sampling_is_reproducible_and_degenerates_to_greedy(model):
  greedy = generate(model, PROMPTS, max_new_tokens=6).tokens
  hot = SamplingConfig(temperature=1.0)
  a = generate(model, PROMPTS, max_new_tokens=6, sampling=hot, rng=jax.random.key(1)).tokens
  b = generate(model, PROMPTS, max_new_tokens=6, sampling=hot, rng=jax.random.key(1)).tokens
  c = generate(model, PROMPTS, max_new_tokens=6, sampling=hot, rng=jax.random.key(2)).tokens
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for narrow in [SamplingConfig(temperature=1.0, top_k=1), SamplingConfig(temperature=1.0, top_p=1e-6)]:
    np.testing.assert_array_equal(
        generate(model, PROMPTS, max_new_tokens=6, sampling=narrow, rng=jax.random.key(3)).tokens,
        greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = jax.vmap(lambda k: sample_logits(logits, k, SamplingConfig(temperature=1.0, top_p=0.7)))
  counts = np.bincount(np.asarray(draw(keys)).reshape(-1), minlength=4)
  assert counts[2] == counts[3] == 0  # 0.5 + 0.3 >= 0.7: the tail is cut
  assert counts[0] / 2000 == pytest.approx(0.5 / 0.8, abs=0.04)


def test_generation_rejects_bad_requests(model):
  with pytest.raises(ValueError, match="max_seq_len"):
    generate(model, [[1, 2]], max_new_tokens=model.config.max_seq_len)
  with pytest.raises(ValueError, match="prompt"):
    generate(model, [[]], max_new_tokens=2)
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.7),
                                      SamplingConfig(temperature=1.3, top_p=0.9, top_k=50)],
                         ids=["greedy", "temperature", "top_p_top_k"])
def test_rollout_log_probs_equal_a_full_forward_recompute(model, sampling):
  """The log-probs RL needs: each generated token's log-probability under the distribution it
  was sampled from, equal (f32) to a forward pass over prompt + completion without a cache."""
  from deepseek_jax.inference.generate import sampling_logits
  stop = 7
  out = generate(model, PROMPTS, max_new_tokens=10, sampling=sampling, rng=jax.random.key(3),
                 stop_tokens=[stop], pad_id=0, return_log_probs=True)
  tokens, lengths, log_probs = (np.asarray(a) for a in (out.tokens, out.lengths, out.log_probs))
  mask = np.asarray(out.mask())
  assert mask.sum(1).tolist() == lengths.tolist()
  assert np.all(log_probs[mask == 0] == 0.0) and np.all(log_probs[mask == 1] <= 0.0)
  for row, prompt in enumerate(PROMPTS):
    n = int(lengths[row])
    full = np.array(list(prompt) + tokens[row, :n].tolist())[None]
    logits = forward(model, jnp.asarray(full)).logits[0, len(prompt) - 1:len(prompt) - 1 + n]
    want = jax.nn.log_softmax(sampling_logits(logits, sampling), axis=-1)
    want = np.take_along_axis(np.asarray(want), tokens[row, :n, None], axis=-1)[:, 0]
    np.testing.assert_allclose(log_probs[row, :n], want, atol=1e-5, rtol=0)
  # Off by default: nothing extra is returned.
  assert generate(model, PROMPTS, max_new_tokens=4).log_probs is None
