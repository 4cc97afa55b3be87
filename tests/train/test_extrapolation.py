"""Loss by position on long windows (deepseek_jax/train/extrapolation.py): windows built by
hand, YaRN's evaluation config, the same weights under a new rotary map, and the per-position
loss against a direct computation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.rope import rotary_from_config
from deepseek_jax.model.transformer import create_model
from deepseek_jax.train import extrapolation as ex


def test_lengths_are_token_counts_or_multiples_of_the_training_length():
  assert ex.parse_lengths(["4x", "2x", "300", "256"], 128) == [256, 300, 512]
  assert ex.parse_lengths(["1.5x"], 64) == [96]
  assert ex.parse_lengths(["1.3x"], 128) == [166]  # 166.4 rounded
  for bad, message in [(["abc"], "'abc' is neither"), (["0"], "gives 0 tokens"),
                       (["0x"], "'0x' gives 0 tokens"), ([], "empty"),
                       (["infx"], "'infx' is neither"), (["nanx"], "'nanx' is neither")]:
    with pytest.raises(ValueError, match=message):
      ex.parse_lengths(bad, 128)


def test_windows_join_whole_documents_and_each_starts_with_bos_and_a_document():
  docs = [np.array([1, 2]), np.array([3, 4, 5]), np.array([6]), np.array([7, 8, 9, 10, 11]),
          np.array([12])]
  w, owner = ex.document_windows(docs, 4, bos=0, separator=[9])
  # [0 1 2 | 9 3 4 5] cut at 5 tokens; then [0 6 | 9 7 8 9 10 11] cut; [0 12] is too short
  np.testing.assert_array_equal(w, [[0, 1, 2, 9, 3], [0, 6, 9, 7, 8]])
  np.testing.assert_array_equal(owner, [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])  # 9 joins the next
  assert w.dtype == owner.dtype == np.int32
  np.testing.assert_array_equal(ex.document_windows(docs, 4, bos=0, separator=[9],
                                                    max_windows=1)[0], [[0, 1, 2, 9, 3]])
  w, owner = ex.document_windows(docs, 2)
  np.testing.assert_array_equal(w, [[1, 2, 3], [6, 7, 8]])
  np.testing.assert_array_equal(owner, [[0, 0, 1], [0, 1, 1]])
  with pytest.raises(ValueError, match="hold 12 tokens, fewer than one window of 101"):
    ex.document_windows(docs, 100)
  with pytest.raises(ValueError, match=">= 1 token"):
    ex.document_windows(docs, 0)


def test_bos_and_eos_are_stripped_from_the_documents():
  seqs = [np.array([0, 5, 6, 1]), np.array([5, 1]), np.array([0, 1]), np.array([7])]
  out = ex.strip_document_marks(seqs, bos=0, eos=1)
  assert [list(s) for s in out] == [[5, 6], [5], [7]]
  assert [list(s) for s in ex.strip_document_marks(seqs, None, None)] == [list(s) for s in seqs]


def test_yarn_at_evaluation_scales_by_the_length_over_the_training_length():
  cfg = ModelConfig.preset("tiny", yarn_factor=1.0, max_seq_len=256)
  plain = ex.extended_config(cfg, 64, 512, yarn=False)
  assert plain.yarn_factor == 1.0 and plain.max_seq_len == 512
  assert ex.extended_config(cfg, 64, 64, yarn=True) == cfg  # not past training: no YaRN
  yarn = ex.extended_config(cfg, 64, 256, yarn=True)
  assert (yarn.yarn_factor, yarn.yarn_original_max_len, yarn.max_seq_len) == (4.0, 64, 256)
  # YaRN's temperature (0.1 ln s + 1)^2 on the softmax scale, and interpolated frequencies
  assert yarn.softmax_scale == pytest.approx(cfg.softmax_scale * (0.1 * math.log(4) + 1) ** 2)
  f0, f1 = rotary_from_config(cfg).inv_freq(), rotary_from_config(yarn).inv_freq()
  assert f1[0] == f0[0] and f1[-1] == pytest.approx(f0[-1] / 4)
  with pytest.raises(ValueError, match="yarn_factor=4.0; evaluate it without"):
    ex.extended_config(ModelConfig.preset("tiny"), 64, 256, yarn=True)


@pytest.fixture(scope="module")
def tiny_model():
  cfg = ModelConfig.preset("tiny", yarn_factor=1.0, n_mtp_modules=0)
  return cfg, create_model(cfg, seed=3)


def test_the_same_weights_under_a_new_rotary_map(tiny_model):
  cfg, model = tiny_model
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40)))
  same = ex.with_config(model, cfg)
  np.testing.assert_array_equal(same(tokens).logits, model(tokens).logits)
  yarn = ex.with_config(model, ex.extended_config(cfg, 16, 64, yarn=True))
  assert yarn.config.yarn_factor == 4.0
  assert nnx.state(yarn, nnx.Param)["embed"]["embedding"][...] is \
      nnx.state(model, nnx.Param)["embed"]["embedding"][...]  # shared, not copied
  assert not np.allclose(yarn(tokens).logits, model(tokens).logits, atol=1e-3)
  with pytest.raises(ValueError, match="changes weight shapes"):
    ex.with_config(model, cfg.replace(kv_lora_rank=16))


def test_position_losses_equal_the_per_token_loss_computed_directly(tiny_model):
  cfg, model = tiny_model
  windows = np.random.default_rng(1).integers(0, cfg.vocab_size, (5, 33)).astype(np.int32)
  got = ex.position_losses(model, windows, batch_size=2)  # 2 + 2 + 1 padded
  logits = np.asarray(model(jnp.asarray(windows[:, :-1])).logits, np.float64)
  log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(log_p, windows[:, 1:, None], -1)[..., 0]
  assert got.shape == (32,)
  np.testing.assert_allclose(got, nll.mean(0), rtol=2e-5)
  # causal: the loss at a position does not depend on the tokens after it
  shorter = ex.position_losses(model, windows[:, :17], batch_size=8)
  np.testing.assert_allclose(shorter, got[:16], rtol=2e-5)
  per_token = ex.token_losses(model, windows, batch_size=3)
  assert per_token.shape == (5, 32)
  np.testing.assert_allclose(per_token, nll, rtol=2e-5)


def test_bucket_means():
  losses = list(range(10))
  assert ex.bucket_means(losses, [0, 4, 8, 16]) == [1.5, 5.5, 8.5]
  assert ex.bucket_means(losses, [0, 10, 20]) == [4.5]
