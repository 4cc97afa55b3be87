"""Loss by position on sequences longer than the training length (length extrapolation), with and
without YaRN: the test of the review's open question 1 (arXiv 2503.11486 §2.1; REFERENCE §11),
whether position still reaches attention past the trained context.

Training rows pack documents with positions restarting at every document (and attention kept
inside each), so a model trained on ``train.seq_len = T`` tokens never saw a position >= T nor a
query-key distance >= T. Here held-out documents are joined into long ones (BOS, then documents
separated by a newline) and cut into windows of L tokens, each starting with BOS and a
document's first token, with positions 0..L-1 and one causal attention span over the window;
the next-token loss is averaged over the windows at every position. Positions < T are the
in-distribution reference of the same windows; positions T..L-1 show what happens beyond.

YaRN (V2 §3.2.2 / Peng et al. 2023; ``model.rope``) at evaluation time, without fine-tuning:
scale s = L / T and original length T, so the rotary frequencies that turn fewer than
``yarn_beta_slow`` times within T are divided by s, those turning more than ``yarn_beta_fast``
times are kept, and the softmax scale gets YaRN's temperature. Only static fields change, so the
trained weights are used unchanged.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.transformer import DeepSeekModel, abstract_model
from deepseek_jax.train.loss import token_log_probs


def parse_lengths(items: Sequence, train_len: int) -> list[int]:
  """Window lengths from ``items``: token counts (256) or multiples of the training length
  ("2x" = 2 * ``train_len``, rounded to whole tokens); sorted, without repeats. Raises
  ValueError naming the item for anything else, a non-positive length or an empty list."""
  lengths = set()
  for item in items:
    text = str(item).strip()
    try:
      n = round(float(text[:-1]) * train_len) if text.endswith("x") else int(text)
    except (ValueError, OverflowError):  # "abc"; "infx", "nanx"
      raise ValueError(f"--lengths: {text!r} is neither a token count (e.g. 512) nor a finite "
                       "multiple of train.seq_len (e.g. 4x)") from None
    if n < 1:
      raise ValueError(f"--lengths: {text!r} gives {n} tokens; a window needs >= 1")
    lengths.add(n)
  if not lengths:
    raise ValueError("--lengths is empty; give e.g. --lengths=2x,4x or --lengths=256,512")
  return sorted(lengths)


def document_windows(documents: Sequence[np.ndarray], length: int, *, bos: Optional[int] = None,
                     separator: Sequence[int] = (), max_windows: Optional[int] = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Windows of ``length + 1`` tokens (inputs = w[:, :-1], targets = w[:, 1:]): ``bos`` (if
  given), then whole documents in order joined by ``separator``, so every window starts at a
  document's first token and reads as one long document. The document that overflows a window
  is cut there and the next window starts with the next document. At most ``max_windows``
  (None: as many as the documents fill).

  Returns (windows [N, length + 1] int32, document [N, length + 1] int32: which document of
  its window each token belongs to, 0 for the first (and BOS), a separator counted with the
  document after it). ``documents``: token ids without BOS/EOS (``strip_document_marks``). An
  EOS inside a window would be an input the model never saw in training (EOS is only ever a
  target), so documents are joined by text it did see, e.g. the tokens of a newline. Raises
  ValueError when ``length`` < 1 or the documents fill no window."""
  if length < 1:
    raise ValueError(f"a window length must be >= 1 token, got {length}")
  start = [] if bos is None else [int(bos)]
  windows, owners, row, owner = [], [], list(start), [0] * len(start)
  for doc in documents:
    index = owner[-1] + 1 if len(row) > len(start) else 0
    if index:
      row.extend(int(t) for t in separator)
    row.extend(int(t) for t in doc)
    owner.extend([index] * (len(row) - len(owner)))
    if len(row) >= length + 1:
      windows.append(row[:length + 1])
      owners.append(owner[:length + 1])
      row, owner = list(start), [0] * len(start)
      if max_windows is not None and len(windows) >= max_windows:
        break
  if not windows:
    total = sum(len(d) for d in documents)
    raise ValueError(f"the held-out documents hold {total} tokens, fewer than one window of "
                     f"{length + 1}; evaluate shorter lengths or add held-out data")
  return np.asarray(windows, np.int32), np.asarray(owners, np.int32)


def strip_document_marks(sequences: Sequence[np.ndarray], bos: Optional[int],
                         eos: Optional[int]) -> list[np.ndarray]:
  """The documents of ``data.token_sequences`` without their leading BOS and trailing EOS."""
  out = []
  for seq in sequences:
    seq = np.asarray(seq)
    if bos is not None and len(seq) and seq[0] == bos:
      seq = seq[1:]
    if eos is not None and len(seq) and seq[-1] == eos:
      seq = seq[:-1]
    if len(seq):
      out.append(seq)
  return out


def extended_config(cfg: ModelConfig, train_len: int, length: int, yarn: bool) -> ModelConfig:
  """``cfg`` for windows of ``length`` tokens: ``max_seq_len`` raised to ``length`` if needed,
  and with ``yarn`` (and ``length > train_len``) YaRN with s = length / train_len and original
  length ``train_len``. Raises ValueError when YaRN is asked of a model that already uses it
  (``yarn_factor > 1``: its rotary map is not the one it was trained with)."""
  updates = {"max_seq_len": max(cfg.max_seq_len, length)}
  if yarn and length > train_len:
    if cfg.yarn_factor > 1.0:
      raise ValueError(f"YaRN at evaluation rescales a model trained without YaRN, but this "
                       f"one has yarn_factor={cfg.yarn_factor}; evaluate it without (evaluate.py "
                       "--noyarn)")
    updates.update(yarn_factor=length / train_len, yarn_original_max_len=train_len)
  return cfg.replace(**updates)


def with_config(model: DeepSeekModel, cfg: ModelConfig) -> DeepSeekModel:
  """The same weights under ``cfg``, which may differ only in static fields (rotary map,
  max_seq_len): the weights are shared, not copied. Raises ValueError when ``cfg`` changes
  a weight's shape."""
  graphdef, abstract = nnx.split(abstract_model(cfg, model.execution))
  state = nnx.state(model)
  want, have = (jax.tree.map(lambda x: x.shape, s) for s in (abstract, state))
  if want != have:
    raise ValueError("the new config changes weight shapes; only static fields (rotary map, "
                     "max_seq_len) may differ")
  return nnx.merge(graphdef, state)


def token_losses(model: DeepSeekModel, windows: np.ndarray, batch_size: int = 8) -> np.ndarray:
  """Next-token loss -log p (nats, float32) [N, L] of every target of ``windows`` [N, L + 1]
  (``document_windows``), one causal span per window, positions 0..L-1; the float32
  log-softmax of ``train.loss``. Batches of ``batch_size`` windows (the last one padded with
  copies, which are dropped)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def nll(state, tokens):
    out = nnx.merge(graphdef, state)(tokens[:, :-1])
    return -token_log_probs(out.logits, tokens[:, 1:])

  losses = []
  for start in range(0, len(windows), batch_size):
    batch = windows[start:start + batch_size]
    n = len(batch)
    if n < batch_size:  # one compiled shape
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, 0)])
    losses.append(np.asarray(jax.device_get(nll(state, jnp.asarray(batch))))[:n])
  return np.concatenate(losses)


def position_losses(model: DeepSeekModel, windows: np.ndarray, batch_size: int = 8) -> np.ndarray:
  """Mean next-token loss (nats, float64) [L] at every position 0..L-1 over ``windows``
  [N, L + 1] (``token_losses`` averaged over the windows)."""
  return token_losses(model, windows, batch_size).astype(np.float64).mean(0)


def bucket_means(losses: Sequence[float], edges: Sequence[int]) -> list[float]:
  """Mean of ``losses`` over [edges[i], edges[i + 1]) for each i (buckets past the end are
  left out)."""
  out = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    if lo < len(losses):
      out.append(float(np.mean(losses[lo:min(hi, len(losses))])))
  return out
