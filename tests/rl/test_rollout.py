"""Rollout: G samples per prompt, and a batch whose stored log-probs are the policy's own (the
GRPO ratio is exactly 1 on the first inner iteration)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.inference.generate import SamplingConfig
from deepseek_jax.model.transformer import forward
from deepseek_jax.rl.rollout import rollout, to_batch
from deepseek_jax.train.loss import token_log_probs

PROMPTS = [[5, 17, 99, 3], [7, 7, 1, 42, 8, 61]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_batch_log_probs_equal_the_policy_recompute(make_model, temperature):
  model = make_model(init_std=0.1)
  ro = rollout(model, PROMPTS, group_size=3, max_new_tokens=6, stop_tokens=[9],
               sampling=SamplingConfig(temperature=temperature), rng=jax.random.key(0))
  assert len(ro.prompts) == 6 and ro.prompts[0] == ro.prompts[2] == PROMPTS[0]
  assert ro.prompts[3] == PROMPTS[1]
  batch = to_batch(ro, seq_len=16)
  assert batch["mask"].sum(1).tolist() == ro.lengths.tolist()
  logits = forward(model, jnp.asarray(batch["inputs"])).logits / temperature
  log_probs = np.asarray(token_log_probs(logits, jnp.asarray(batch["targets"])))
  m = batch["mask"] > 0
  np.testing.assert_allclose(log_probs[m], batch["old_log_probs"][m], atol=1e-5, rtol=0)
  # completion tokens sit where the mask says
  for r, prompt in enumerate(ro.prompts):
    n = int(ro.lengths[r])
    assert batch["targets"][r, len(prompt) - 1:len(prompt) - 1 + n].tolist() == \
        ro.tokens[r, :n].tolist()


def test_a_row_that_does_not_fit_is_named(make_model):
  ro = rollout(make_model(), PROMPTS, group_size=2, max_new_tokens=6,
               sampling=SamplingConfig(temperature=1.0), rng=jax.random.key(0))
  want = r"row 0: prompt \(4 tokens\) \+ completion \(6\) needs seq_len >= 9, got 6"
  with pytest.raises(ValueError, match=want):
    to_batch(ro, seq_len=6)
