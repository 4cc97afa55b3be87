"""The data pipeline: tokenizers, sources, chunking, packing, sharding, resumable iteration."""

import json

import ml_collections
import numpy as np
import pytest

from deepseek_jax.train import data as D
from deepseek_jax.train.corpus import generate_corpus


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(source="corpus", corpus_documents=400, corpus_seed=0,
                                     text_glob="", tokens_path="", tokenizer="byte",
                                     tokenizer_path="", packing=True, packing_bins=16,
                                     eval_every=50))
  c.update(kw)
  return c


def _batches(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_byte_tokenizer_round_trips_utf8():
  tok = D.ByteTokenizer()
  text = "Zoë has 3 cats — ünïcode ✓"
  assert tok.decode(tok.encode(text)) == text
  assert min(tok.encode(text)) >= 3 and tok.vocab_size == 261


def test_corpus_is_deterministic_and_its_facts_are_consistent():
  assert generate_corpus(50, seed=3) == generate_corpus(50, seed=3)
  docs = generate_corpus(3000, seed=0)
  towns = {d.split(" lives in ")[1].split(".")[0] for d in docs if d.startswith("Mia lives in")}
  assert len(towns) == 1  # Mia lives in one place across every document


def test_chunks_overlap_by_one_so_every_token_is_a_target_once():
  seq = np.arange(10, dtype=np.int32)
  chunks = D.chunk([seq], seq_len=4)
  assert [c.tolist() for c in chunks] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
  assert sum(len(c) - 1 for c in chunks) == len(seq) - 1


@pytest.mark.parametrize("packing", [True, False])
def test_batches_pair_each_input_with_its_next_token_inside_one_document(packing):
  batches = _batches(D.make_dataset(_cfg(packing=packing), D.ByteTokenizer(), seq_len=64,
                                    batch_size=4, seed=0), 4)
  b = batches[-1]
  assert {k: v.shape for k, v in b.items()} == {k: (4, 64) for k in
                                               ("inputs", "targets", "segment_ids", "positions", "mask")}
  seg, inp, tgt = b["segment_ids"], b["inputs"], b["targets"]
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  np.testing.assert_array_equal(tgt[:, :-1][same], inp[:, 1:][same])
  np.testing.assert_array_equal(b["mask"], seg > 0)
  starts = (b["positions"] == 0) & (seg > 0)
  assert (inp[starts] == D.ByteTokenizer.bos_id).any()  # segments begin at documents (or chunks of them)
  if packing:  # several documents share a row somewhere
    assert any((x["segment_ids"].max(-1) > 1).any() for x in batches)


def test_shuffle_is_seeded_and_process_shards_are_disjoint():
  tok = D.ByteTokenizer()
  key = lambda b: b["inputs"].tobytes()
  a = _batches(D.make_dataset(_cfg(packing=False), tok, seq_len=64, batch_size=2, seed=1), 5)
  b = _batches(D.make_dataset(_cfg(packing=False), tok, seq_len=64, batch_size=2, seed=1), 5)
  c = _batches(D.make_dataset(_cfg(packing=False), tok, seq_len=64, batch_size=2, seed=2), 5)
  assert [key(x) for x in a] == [key(x) for x in b] != [key(x) for x in c]
  rows = lambda shard: {r.tobytes() for x in _batches(D.make_dataset(
      _cfg(packing=False), tok, seq_len=64, batch_size=2, seed=1, shard_index=shard,
      shard_count=2), 20) for r in x["inputs"]}
  assert not rows(0) & rows(1)


def test_iterator_state_restores_the_exact_next_batches():
  tok = D.ByteTokenizer()
  it = iter(D.make_dataset(_cfg(), tok, seq_len=64, batch_size=4, seed=0))
  _ = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  resumed = iter(D.make_dataset(_cfg(), tok, seq_len=64, batch_size=4, seed=0))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_eval_split_is_held_out_and_finite():
  tok = D.ByteTokenizer()
  train = {s.tobytes() for s in D.token_sequences(_cfg(), tok, "train")}
  held = D.token_sequences(_cfg(), tok, "eval")
  assert held and not any(s.tobytes() in train for s in held)
  batches = list(D.make_dataset(_cfg(packing=False), tok, seq_len=64, batch_size=4,
                                split="eval", repeat=False))
  padded = D.pad_batch(batches[-1], 4)
  assert padded["inputs"].shape == (4, 64)


def test_text_files_and_pretokenized_arrays(tmp_path):
  (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph", encoding="utf-8")
  (tmp_path / "b.txt").write_text("third", encoding="utf-8")
  tok = D.ByteTokenizer()
  seqs = D.token_sequences(_cfg(source="text", text_glob=str(tmp_path / "*.txt"), eval_every=1000),
                           tok, "train")
  assert sorted(tok.decode(s) for s in seqs) == ["first paragraph", "second paragraph", "third"]
  stream = np.array([1, 5, 6, 2, 1, 7, 2, 1, 8, 9, 2], np.int32)
  np.save(tmp_path / "tokens.npy", stream)
  seqs = D.token_sequences(_cfg(source="tokens", tokens_path=str(tmp_path / "tokens.npy"),
                                eval_every=1000), tok, "train")
  assert [s.tolist() for s in seqs] == [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 2]]
  with pytest.raises(FileNotFoundError, match="data.text_glob"):
    D.token_sequences(_cfg(source="text", text_glob=str(tmp_path / "*.md")), tok, "train")


def test_hf_tokenizer_json(tmp_path):
  import tokenizers  # the [test] extra installs it
  vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, "mia": 4, "lives": 5, "in": 6}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  cfg = _cfg(tokenizer="hf", tokenizer_path=str(tmp_path / "tokenizer.json"))
  cfg.bos_token, cfg.eos_token, cfg.pad_token = "[BOS]", "[EOS]", "[PAD]"
  hf = D.make_tokenizer(cfg)
  assert hf.encode("mia lives in oakridge") == [4, 5, 6, 3] and hf.vocab_size == 7
  assert (hf.bos_id, hf.eos_id, hf.pad_id) == (1, 2, 0)


def test_byte_decode_shows_ids_past_the_bytes_as_placeholders():
  """A model's vocab may exceed the tokenizer's (tiny: 320 > 261); an untrained model samples
  those spare ids, and decoding them must neither crash the end-of-run sample nor hide them.
  The chat role tokens (259, 260) decode to their names."""
  tok = D.ByteTokenizer()
  ids = [tok.bos_id] + tok.encode("hé") + [tok.offset + 258] + tok.encode("!") + [319, tok.eos_id]
  assert tok.decode(ids) == "hé<id 261>!<id 319>"
  assert tok.decode([259, 260]) == "<|User|><|Assistant|>"


def test_text_that_is_not_utf8_is_refused_or_replaced_with_a_count(tmp_path, caplog):
  (tmp_path / "a.txt").write_bytes("café\n\nplain".encode("latin-1"))
  with pytest.raises(ValueError, match=r"a.txt is not valid UTF-8 \(byte 3: b'\\xe9'\).*text_errors"):
    D._text_documents(str(tmp_path / "*.txt"))
  with caplog.at_level("WARNING"):
    docs = D._text_documents(str(tmp_path / "*.txt"), errors="replace")
  assert docs == ["caf\ufffd", "plain"] and "1 byte sequence(s)" in caplog.text


def test_an_empty_text_file_and_an_empty_glob_are_named(tmp_path):
  (tmp_path / "empty.txt").write_text("\n\n  \n")
  with pytest.raises(ValueError, match="empty.txt .* holds no text"):
    D._text_documents(str(tmp_path / "*.txt"))
  with pytest.raises(FileNotFoundError, match=r"data.text_glob=.*nothing\*.md' matched no files"):
    D._text_documents(str(tmp_path / "nothing*.md"))


@pytest.mark.parametrize("tokens, match", [
    (np.array([5, -1, 7, 2] * 50), r"ids in \[-1, 7\], outside the model's \[0, 320\)"),
    (np.array([5, 400, 7, 2] * 50), r"ids in \[2, 400\]"),
    (np.array([5.0, 6.0, 2.0] * 50), "holds float64 values; token ids must be integers"),
])
def test_token_files_with_bad_ids_or_dtypes_are_refused(tmp_path, tokens, match):
  path = tmp_path / "tokens.npy"
  np.save(path, tokens)
  cfg = _cfg(source="tokens", tokens_path=str(path), eval_every=2)
  with pytest.raises(ValueError, match=match):
    D.check_data(cfg, D.ByteTokenizer(), vocab_size=320, seq_len=8, shard_count=1)


def test_a_data_set_too_small_for_a_held_out_batch_is_refused_before_training(tmp_path):
  (tmp_path / "one.txt").write_text("only one document here")
  cfg = _cfg(source="text", text_glob=str(tmp_path / "*.txt"))
  with pytest.raises(ValueError, match="the held-out split has 0 chunk"):
    D.check_data(cfg, D.ByteTokenizer(), vocab_size=320, seq_len=8, shard_count=1)
