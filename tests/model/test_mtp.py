"""MTP: depth k at position i reads t_{i+k} and predicts t_{i+k+1}, within its own segment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model.mtp import mtp_targets
from deepseek_jax.model.transformer import forward


def test_mtp_targets_shift_by_depth():
  targets = jnp.array([[11, 12, 13, 14, 15]])  # inputs were [10, 11, 12, 13, 14]
  mask = jnp.ones((1, 5))
  tokens_1, targets_1, mask_1 = mtp_targets(targets, mask, None, 1)
  np.testing.assert_array_equal(tokens_1, [[11, 12, 13, 14, 15]])  # t_{i+1}
  np.testing.assert_array_equal(targets_1, [[12, 13, 14, 15, 0]])  # t_{i+2}
  np.testing.assert_array_equal(mask_1, [[1, 1, 1, 1, 0]])
  tokens_2, targets_2, mask_2 = mtp_targets(targets, mask, None, 2)
  np.testing.assert_array_equal(tokens_2, [[12, 13, 14, 15, 0]])  # t_{i+2}
  np.testing.assert_array_equal(targets_2, [[13, 14, 15, 0, 0]])  # t_{i+3}
  np.testing.assert_array_equal(mask_2, [[1, 1, 1, 0, 0]])


def test_mtp_scores_answer_targets_even_when_the_prompt_is_masked():
  targets = jnp.array([[11, 12, 13, 14, 15, 0]])
  mask = jnp.array([[0, 0, 1, 1, 1, 0]])  # SFT: only the answer's targets count
  _, _, mask_1 = mtp_targets(targets, mask, None, 1)
  np.testing.assert_array_equal(mask_1, [[0, 1, 1, 1, 0, 0]])  # position 1 predicts t_3 = 13


def test_mtp_mask_respects_padding_and_packed_segments():
  targets = jnp.array([[11, 12, 13, 21, 22, 0]])
  mask = jnp.array([[1, 1, 1, 1, 1, 0]])
  segments = jnp.array([[1, 1, 1, 2, 2, 0]])
  _, _, mask_1 = mtp_targets(targets, mask, segments, 1)
  # position 2's depth-1 target (t_4 = 21) belongs to the next document; position 4 hits padding
  np.testing.assert_array_equal(mask_1, [[1, 1, 0, 1, 0, 0]])


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_logits_at_i_depend_on_token_i_plus_k_and_nothing_later(make_model, depth):
  model = make_model(init_std=0.1, n_mtp_modules=2)
  tokens = jax.random.randint(jax.random.key(0), (1, 10), 0, 128)
  targets = jnp.concatenate([tokens[:, 1:], jnp.array([[7]])], axis=1)
  mask = jnp.ones((1, 10))
  hidden = forward(model, tokens).hidden

  @jax.jit
  def logits(targets):
    return model.mtp_forward(hidden, targets, mask)[depth - 1].logits

  base = logits(targets)
  j = 5 + depth - 1  # targets[j] = t_{j+1} = t_{5+depth}
  changed = logits(targets.at[0, j].set((targets[0, j] + 1) % 128))
  np.testing.assert_allclose(base[:, :5], changed[:, :5], atol=1e-6)  # positions < 5 unaffected
  assert float(jnp.abs(base[:, 5] - changed[:, 5]).max()) > 1e-3  # position 5 reads t_{5+k}
