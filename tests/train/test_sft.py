"""SFT data: the chat template, the response-only loss (by hand), packing that equals one
record per row, and bad records named by file and line."""

import json

import jax
import numpy as np
import pytest

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.transformer import create_model
from deepseek_jax.train import data as D
from deepseek_jax.train.config import default_config
from deepseek_jax.train.loss import loss_fn
from deepseek_jax.train.sft import ASSISTANT, USER, encode_record, read_records

RECORDS = [{"prompt": "3 + 4 =", "response": "<think>7</think><answer>7</answer>"},
           {"prompt": "Q: Where does Mia live?\nA:", "response": "Oakridge", "system": "Be brief."}]


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_the_template_masks_everything_but_the_response_and_eos():
  tok = D.ByteTokenizer()
  ids, mask = encode_record(RECORDS[1], tok)
  user, assistant = tok.special_tokens[USER], tok.special_tokens[ASSISTANT]
  context = [tok.bos_id] + tok.encode("Be brief.") + [user] + tok.encode(RECORDS[1]["prompt"]) \
      + [assistant]
  assert ids.tolist() == context + tok.encode("Oakridge") + [tok.eos_id]
  targets = ids[1:]
  assert tok.decode(targets[mask > 0]) == "Oakridge" and targets[mask > 0][-1] == tok.eos_id
  assert mask.sum() == len("Oakridge") + 1 and not mask[:len(context) - 1].any()
  assert tok.decode([user, assistant]) == USER + ASSISTANT  # role tokens are one id each
  assert user not in tok.encode(USER)  # and text never encodes to them


def _batches(tmp_path, packing: bool):
  cfg = default_config().data
  with cfg.unlocked():
    cfg.source, cfg.sft_path, cfg.packing, cfg.eval_every = "sft", _write(
        tmp_path / "sft.jsonl", RECORDS), packing, 1000
  return next(iter(D.make_dataset(cfg, D.ByteTokenizer(), seq_len=96, batch_size=2,
                                  repeat=False)))


def test_the_loss_is_cross_entropy_on_response_tokens_only_by_hand(tmp_path):
  model = create_model(ModelConfig.preset("tiny", vocab_size=320, n_mtp_modules=0), 0)
  batch = _batches(tmp_path, packing=False)
  _, metrics = loss_fn(model, {k: jax.numpy.asarray(v) for k, v in batch.items()})
  logits = np.asarray(model(batch["inputs"], positions=batch["positions"],
                            segment_ids=batch["segment_ids"]).logits, np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  want = -(picked * batch["mask"]).sum() / batch["mask"].sum()
  expect = sum(encode_record(r, D.ByteTokenizer())[1].sum() for r in RECORDS)
  assert batch["mask"].sum() == expect and batch["token_mask"].sum() > expect
  np.testing.assert_allclose(metrics["ce"], want, rtol=1e-5)


def test_packed_rows_give_the_loss_of_one_record_per_row(tmp_path):
  model = create_model(ModelConfig.preset("tiny", vocab_size=320), 0)  # with MTP
  packed, padded = _batches(tmp_path, True), _batches(tmp_path, False)
  assert packed["segment_ids"].max() == 2  # both records share one row
  m1 = loss_fn(model, {k: jax.numpy.asarray(v) for k, v in packed.items()})[1]
  m2 = loss_fn(model, {k: jax.numpy.asarray(v) for k, v in padded.items()})[1]
  for key in ("ce", "mtp_ce", "tokens"):
    np.testing.assert_allclose(m1[key], m2[key], rtol=2e-5, err_msg=key)


def test_bad_records_are_named_by_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: an SFT record needs"):
    read_records(str(path))
  path.write_text('{"prompt": "a" "response": "b"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: not JSON \(.* at column 16\)"):
    read_records(str(path))  # the column of the missing comma
  with pytest.raises(FileNotFoundError, match=r"no SFT file given \(config.data.sft_path is "):
    read_records("")
  cfg = default_config().data
  with cfg.unlocked():
    cfg.source, cfg.sft_path = "sft", _write(tmp_path / "long.jsonl",
                                             [{"prompt": "p", "response": "x" * 100}])
  with pytest.raises(ValueError, match=r"long.jsonl: train record 0 has 105 tokens"):
    D.check_data(cfg, D.ByteTokenizer(), vocab_size=320, seq_len=32, shard_count=1)
