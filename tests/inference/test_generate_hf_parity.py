"""generate() counts real tokens against max_seq_len, never the bucket's padding, and the tokens
of a request that just fits equal transformers' greedy generation (CPU, float32)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from deepseek_jax.inference.generate import cache_slots, generate  # noqa: E402
from deepseek_jax.interop.hf_checkpoint import load_hf_checkpoint  # noqa: E402
from tests.interop.test_hf_parity import _COMMON, _hf_model  # noqa: E402

MAX_SEQ_LEN = 128
CASE = "v3_qlora_groups_yarn"  # query compression, expert groups, YaRN past its 64 positions


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(HF DeepseekV3 model, ours loaded from its checkpoint with max_seq_len=128).

  The shared case builder saves max_position_embeddings=256; the limit under test is ours,
  set at load (YaRN's factor 4 over 64 positions is explicit, so it does not depend on it).
  """
  hf_model = _hf_model(CASE)
  directory = str(tmp_path_factory.mktemp(CASE))
  hf_model.save_pretrained(directory)
  model = load_hf_checkpoint(directory, max_seq_len=MAX_SEQ_LEN)
  assert model.config.max_seq_len == MAX_SEQ_LEN
  return hf_model, model


def _prompt(length: int, seed: int) -> list[int]:
  return np.random.RandomState(seed).randint(1, _COMMON["vocab_size"], length).tolist()


def _hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
  with torch.no_grad():
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
  return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def reference(models):
  """Two prompts (100 and 37 tokens) and transformers' 20 greedy tokens for each."""
  hf_model, _ = models
  prompts = [_prompt(100, seed=1), _prompt(37, seed=2)]
  want = [_hf_greedy(hf_model, p, 20) for p in prompts]
  assert len(set(want[0])) > 3  # not a degenerate repeat of one token
  return prompts, want


def test_100_token_prompt_plus_20_new_fits_max_seq_len_128_and_matches_transformers(models,
                                                                                     reference):
  _, model = models
  prompts, want = reference
  out = generate(model, prompts, max_new_tokens=20)  # bucket 128: 128 + 20 > 128, 100 + 20 not
  assert np.asarray(out.tokens).tolist() == want
  np.testing.assert_array_equal(out.lengths, [20, 20])
  expanded = generate(model, prompts[:1], max_new_tokens=20, cache_kind="expanded")
  assert np.asarray(expanded.tokens).tolist() == want[:1]


def test_a_prompt_whose_bucket_passes_max_seq_len_still_matches_transformers(models, reference):
  _, model = models
  prompts, want = reference
  wide = generate(model, prompts[:1], max_new_tokens=20, prompt_bucket=96)  # bucket 192 > 128
  assert np.asarray(wide.tokens).tolist() == want[:1]
  tokens = np.full((2, 200), 7, np.int32)  # arrays padded past max_seq_len: width is not length
  for row, p in enumerate(prompts):
    tokens[row, :len(p)] = p
  arrays = generate(model, (tokens, np.array([100, 37])), max_new_tokens=20)
  assert np.asarray(arrays.tokens).tolist() == want


def test_a_request_past_max_seq_len_is_refused_naming_the_real_lengths(models):
  _, model = models
  expected = (r"^longest prompt \(110 tokens\) \+ max_new_tokens \(20\) = 130 exceeds "
              r"ModelConfig\.max_seq_len=128; shorten the prompt or lower max_new_tokens$")
  with pytest.raises(ValueError, match=expected):
    generate(model, [_prompt(110, seed=3), _prompt(5, seed=4)], max_new_tokens=20)
  tokens = np.zeros((1, 100), np.int32)  # 100 columns, 110 real tokens claimed: refused too
  with pytest.raises(ValueError, match=r"prompt lengths must lie in \[1, 100\], got \[110\]"):
    generate(model, (tokens, np.array([110])), max_new_tokens=18)
  generate(model, [_prompt(108, seed=3)], max_new_tokens=20)  # exactly 128: accepted


@pytest.mark.parametrize("prompt_len, new, max_len, slots", [
    (128, 20, 128, 128),  # 100 + 20 in a 128 bucket: the padded prefill fits 2 pages
    (64, 12, 256, 128),  # 64 + 11 slots written -> 2 pages
    (64, 1, 256, 64),  # one new token is never fed back: no slot for it
    (128, 200, 256, 256),  # never more than max_seq_len, rounded up to pages
    (16, 12, 100, 64),
])
def test_cache_holds_the_padded_prefill_and_every_real_slot_in_whole_pages(prompt_len, new,
                                                                            max_len, slots):
  assert cache_slots(prompt_len, new, max_len) == slots
