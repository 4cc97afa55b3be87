"""Data: tokenizers, document sources and the grain pipeline that feeds the train step.

    documents -> tokens [BOS ... EOS] -> chunks of <= T+1 tokens -> (inputs, targets) pairs
      -> seeded shuffle (reshuffled every epoch) -> this process's shard -> repeat
      -> packing (several documents per row, with segment ids and positions) or padding
      -> batches of global_batch / process_count rows

Every row position either has a real next-token target inside its own document (mask 1) or is
padding (mask 0, segment id 0), which is what the loss and the attention mask expect. The
iterator is a grain ``DatasetIterator``: its state is saved with each checkpoint, so a resumed
run reads exactly the batches an uninterrupted run would have read.

Sources (``data.source``): ``corpus`` (the embedded generated corpus, no network), ``text``
(files matching ``data.text_glob``, one document per blank-line-separated paragraph) and
``tokens`` (a .npy of token ids: a 1-D stream split at EOS, or 2-D rows). Tokenizers: ``byte``
(UTF-8 bytes + pad/bos/eos + 2 chat role tokens, 261 ids) or ``hf`` (a HuggingFace
``tokenizer.json``). ``sft``: prompt/response JSON lines (``train/sft.py``).
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Optional

import grain
import numpy as np

from deepseek_jax.train import sft
from deepseek_jax.train.corpus import generate_corpus
from deepseek_jax.train.sft import ASSISTANT, USER


class ByteTokenizer:
  """UTF-8 bytes shifted by 3; 0 = pad, 1 = bos, 2 = eos; 259 and 260 the chat role tokens
  (``special_tokens``, for SFT: ``train/sft.py``), never produced by ``encode``."""

  pad_id, bos_id, eos_id = 0, 1, 2
  offset = 3
  special_tokens = {USER: 256 + offset, ASSISTANT: 257 + offset}
  vocab_size = 256 + offset + len(special_tokens)

  def encode(self, text: str) -> list[int]:
    return [b + self.offset for b in text.encode("utf-8")]

  def decode(self, ids) -> str:
    """Text of ``ids``: pad/bos/eos are dropped, role tokens render as their names; other ids
    past the 256 bytes (the model's
    spare vocab: vocab_size may exceed the tokenizer's, and an early or diverged model samples
    them) render as a visible placeholder ``<id N>``; invalid UTF-8 as U+FFFD."""
    names = {v: k for k, v in self.special_tokens.items()}
    text, run = [], bytearray()
    for i in map(int, ids):
      if 0 <= i - self.offset < 256:
        run.append(i - self.offset)
      elif i >= self.offset:
        text.append(run.decode("utf-8", errors="replace"))
        text.append(names.get(i, f"<id {i}>"))
        run = bytearray()
    text.append(run.decode("utf-8", errors="replace"))
    return "".join(text)


class HFTokenizer:
  """A HuggingFace ``tokenizer.json`` (needs the ``tokenizers`` package)."""

  def __init__(self, path: str, bos: Optional[str] = None, eos: Optional[str] = None,
               pad: Optional[str] = None):
    try:
      from tokenizers import Tokenizer
    except ImportError as e:
      raise ImportError("data.tokenizer='hf' needs `pip install tokenizers`") from e
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data.tokenizer_path={path!r} does not exist")
    self._tok = Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size()

    def token_id(name, fallback):
      if name is None:
        return fallback
      idx = self._tok.token_to_id(name)
      if idx is None:
        raise ValueError(f"special token {name!r} is not in the vocabulary of {path}")
      return idx

    self.bos_id = token_id(bos, None)
    self.eos_id = token_id(eos, None)
    self.pad_id = token_id(pad, 0)
    # Chat role tokens (train/sft.py): ours, or DeepSeek-V3/R1's spelling with fullwidth bars.
    self.special_tokens = {}
    for role in (USER, ASSISTANT):
      for spelling in (role, role.replace("|", "\uff5c")):
        idx = self._tok.token_to_id(spelling)
        if idx is not None:
          self.special_tokens[role] = idx
          break

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


def make_tokenizer(cfg):
  if cfg.tokenizer == "byte":
    return ByteTokenizer()
  if cfg.tokenizer == "hf":
    return HFTokenizer(cfg.tokenizer_path, cfg.get("bos_token"), cfg.get("eos_token"),
                       cfg.get("pad_token"))
  raise ValueError(f"data.tokenizer must be 'byte' or 'hf', got {cfg.tokenizer!r}")


def _text_documents(pattern: str, errors: str = "strict") -> list[str]:
  """Documents (blank-line separated paragraphs) of the files ``pattern`` matches.

  Raises FileNotFoundError for a glob that matches no file, ValueError for an empty file and,
  with ``errors="strict"``, for a file that is not UTF-8 (naming the file and the byte);
  ``errors="replace"`` reads U+FFFD for bad bytes and logs how many there were per file.
  """
  files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not files:
    raise FileNotFoundError(f"data.text_glob={pattern!r} matched no files")
  docs = []
  for path in files:
    with open(path, "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      if errors == "strict":
        raise ValueError(f"{path} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})"
                         "; convert it to UTF-8, or set data.text_errors='replace' to train on "
                         "U+FFFD in place of bad bytes") from None
      text = raw.decode("utf-8", errors="replace")
      logging.warning("%s: %d byte sequence(s) that are not UTF-8 read as U+FFFD "
                      "(data.text_errors='replace')", path, text.count("\ufffd"))
    found = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not found:
      raise ValueError(f"{path} (matched by data.text_glob={pattern!r}) holds no text")
    docs.extend(found)
  return docs


def _split(items: list, split: str, eval_every: int) -> list:
  """Every ``eval_every``-th item is held out for evaluation."""
  if split == "train":
    return [x for i, x in enumerate(items) if i % eval_every != eval_every - 1]
  if split == "eval":
    return [x for i, x in enumerate(items) if i % eval_every == eval_every - 1]
  raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def sft_examples(cfg, tokenizer, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """(ids, loss_mask) of every SFT record of a split (``sft.encode_record``; every
  ``data.eval_every``-th record is held out)."""
  records = sft.read_records(cfg.sft_path)
  return [sft.encode_record(r, tokenizer) for r in _split(records, split, cfg.eval_every)]


def token_sequences(cfg, tokenizer, split: str) -> list[np.ndarray]:
  """All token sequences (documents with BOS/EOS) of a split, before chunking."""
  if cfg.source == "sft":
    return [ids for ids, _ in sft_examples(cfg, tokenizer, split)]
  if cfg.source == "tokens":
    arr = np.load(cfg.tokens_path)
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"data.tokens_path={cfg.tokens_path!r} holds {arr.dtype} values; token ids "
                       "must be integers")
    if arr.ndim == 2:
      seqs = list(arr.astype(np.int32))
    elif arr.ndim == 1:
      eos = tokenizer.eos_id
      cuts = np.flatnonzero(arr == eos) + 1 if eos is not None else []
      seqs = [s for s in np.split(arr.astype(np.int32), cuts) if len(s) > 1]
    else:
      raise ValueError(f"data.tokens_path holds a {arr.ndim}-D array; expected 1-D or 2-D")
    return _split(seqs, split, cfg.eval_every)
  if cfg.source == "corpus":
    docs = generate_corpus(cfg.corpus_documents, cfg.corpus_seed)
  elif cfg.source == "text":
    docs = _text_documents(cfg.text_glob, cfg.get("text_errors", "strict"))
  else:
    raise ValueError(f"data.source must be 'corpus', 'text', 'tokens' or 'sft', got "
                     f"{cfg.source!r}")
  bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
  eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  return [np.asarray(bos + tokenizer.encode(d) + eos, np.int32) for d in _split(docs, split, cfg.eval_every)]


def check_data(cfg, tokenizer, *, vocab_size: int, seq_len: int, shard_count: int) -> None:
  """Everything about the data that would otherwise fail during or after training: ids outside
  [0, vocab_size), and a train or held-out split with fewer chunks than the processes reading
  it (the held-out loss at the end needs one). Raises ValueError naming the field or file."""
  for split in ("train", "eval"):
    if cfg.source == "sft":
      _sft_pieces(cfg, tokenizer, split, seq_len)  # a record too long for a row
    seqs = token_sequences(cfg, tokenizer, split)
    if seqs and cfg.source == "tokens":
      low = min(int(s.min()) for s in seqs)
      high = max(int(s.max()) for s in seqs)
      if low < 0 or high >= vocab_size:
        raise ValueError(f"data.tokens_path={cfg.tokens_path!r} holds ids in [{low}, {high}], "
                         f"outside the model's [0, {vocab_size}); fix the file or raise "
                         "config.model.overrides.vocab_size")
    pieces = len(chunk(seqs, seq_len))
    if pieces < shard_count:
      what = "held-out" if split == "eval" else "training"
      raise ValueError(f"the {what} split has {pieces} chunk(s) of train.seq_len={seq_len} for "
                       f"{shard_count} process(es): the data set is too small (every "
                       f"data.eval_every={cfg.eval_every}-th document is held out); add data or "
                       "lower data.eval_every")


def chunk(seqs: list[np.ndarray], seq_len: int) -> list[np.ndarray]:
  """Split sequences into pieces of <= seq_len + 1 tokens overlapping by one token, so every
  token after the first is a target exactly once."""
  chunks = []
  for s in seqs:
    for start in range(0, max(len(s) - 1, 1), seq_len):
      piece = s[start:start + seq_len + 1]
      if len(piece) > 1:
        chunks.append(piece)
  return chunks


def _example(piece: np.ndarray) -> dict:
  return {"inputs": piece[:-1], "targets": piece[1:]}


def _sft_example(example: tuple) -> dict:
  ids, loss_mask = example
  return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": loss_mask}


def _pad_example(seq_len: int, pad_id: int):
  def pad(example: dict) -> dict:
    n = len(example["inputs"])
    out = {k: np.full(seq_len, pad_id, np.int32) for k in ("inputs", "targets")}
    out["inputs"][:n], out["targets"][:n] = example["inputs"], example["targets"]
    if "loss_mask" in example:
      out["loss_mask"] = np.zeros(seq_len, np.float32)
      out["loss_mask"][:n] = example["loss_mask"]
    out["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    out["positions"] = np.where(out["segment_ids"] > 0, np.arange(seq_len), 0).astype(np.int32)
    return out
  return pad


def _model_batch(packed: dict) -> dict:
  """grain's packed keys -> the batch the loss expects: ``mask`` = the real tokens, times the
  response mask for SFT, whose ``token_mask`` (MoE statistics) stays every real token."""
  if "inputs_segment_ids" in packed:
    packed = {"inputs": packed["inputs"], "targets": packed["targets"],
              "segment_ids": packed["inputs_segment_ids"], "positions": packed["inputs_positions"],
              **({"loss_mask": packed["loss_mask"]} if "loss_mask" in packed else {})}
  real = (np.asarray(packed["segment_ids"]) > 0).astype(np.float32)
  if "loss_mask" in packed:
    packed["mask"] = real * np.asarray(packed.pop("loss_mask"), np.float32)
    packed["token_mask"] = real
  else:
    packed["mask"] = real
  return {k: np.asarray(v) for k, v in packed.items()}


def _sft_pieces(cfg, tokenizer, split: str, seq_len: int) -> list[tuple]:
  examples = sft_examples(cfg, tokenizer, split)
  for i, (ids, _) in enumerate(examples):
    if len(ids) - 1 > seq_len:
      raise ValueError(f"{cfg.sft_path}: {split} record {i} has {len(ids)} tokens in the chat "
                       f"template; rows hold train.seq_len + 1 = {seq_len + 1}; raise "
                       "config.train.seq_len or shorten the record")
  return examples


def make_dataset(cfg, tokenizer, *, seq_len: int, batch_size: int, split: str = "train",
                 seed: int = 0, shard_index: int = 0, shard_count: int = 1,
                 repeat: bool = True) -> grain.IterDataset:
  """The pipeline for one process: ``batch_size`` rows per batch (this process's share)."""
  sft_source = cfg.source == "sft"
  pieces = (_sft_pieces(cfg, tokenizer, split, seq_len) if sft_source
            else chunk(token_sequences(cfg, tokenizer, split), seq_len))
  if len(pieces) < shard_count:
    raise ValueError(f"data split {split!r} has {len(pieces)} chunks, fewer than the "
                     f"{shard_count} processes reading it")
  ds = grain.MapDataset.source(pieces).seed(seed).shuffle()[shard_index::shard_count]
  if repeat:
    ds = ds.repeat(None)
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  example = _sft_example if sft_source else _example
  if cfg.packing:
    it = ds.map(example).to_iter_dataset(read)
    lengths = {"inputs": seq_len, "targets": seq_len}
    if sft_source:
      lengths["loss_mask"] = seq_len
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct=lengths, num_packing_bins=batch_size, seed=seed)
  else:
    it = ds.map(example).map(_pad_example(seq_len, tokenizer.pad_id)).to_iter_dataset(read)
  return it.batch(batch_size, drop_remainder=repeat).map(_model_batch)


def pad_batch(batch: dict, batch_size: int) -> dict:
  """Pad a short final batch with fully masked rows (evaluation without dropping data)."""
  n = len(batch["inputs"])
  if n == batch_size:
    return batch
  return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}
