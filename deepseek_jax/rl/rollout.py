"""Rollout: G sampled completions per prompt from the compiled ``generate``, with the sampling
distribution's log-probs, and the train-step batch GRPO/PPO learn from.

Axis legend: N = prompts x G rows, L max new tokens, T the batch's sequence length.

Row r = prompt ``r // G``'s sample ``r % G`` (the order ``advantages.group_advantages``
groups). ``to_batch`` lays each row out as prompt + completion, right-padded to T:
completion token j is ``targets[P - 1 + j]`` for a prompt of P tokens, so ``mask`` is 1 exactly
there (the stop token included, padding after it excluded) and ``old_log_probs`` carries the
rollout's log-prob of that token at the same position.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from deepseek_jax.inference.generate import SamplingConfig, generate


@dataclasses.dataclass(frozen=True)
class Rollout:
  """G completions per prompt: ``prompts`` (N token lists, each prompt repeated G times in a
  row), ``tokens`` [N, L] int32, ``lengths`` [N], ``log_probs`` [N, L] float32 (0 past a
  row's length) under the sampling distribution, ``group_size`` G."""

  prompts: list
  tokens: np.ndarray
  lengths: np.ndarray
  log_probs: np.ndarray
  group_size: int


def rollout(model, prompts: Sequence[Sequence[int]], *, group_size: int, max_new_tokens: int,
            sampling: SamplingConfig, stop_tokens: Sequence[int] = (), pad_id: int = 0,
            rng: Optional[jax.Array] = None, prompt_bucket: int = 64) -> Rollout:
  """Sample ``group_size`` completions of each prompt (one ``generate`` call over N rows).
  Raises ValueError for group_size < 1, an empty prompt, or a prompt + max_new_tokens over
  the model's max_seq_len (before compiling). ``prompt_bucket``: as ``generate``'s."""
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")
  rows = [list(p) for p in prompts for _ in range(group_size)]
  out = generate(model, rows, max_new_tokens=max_new_tokens, sampling=sampling,
                 stop_tokens=stop_tokens, pad_id=pad_id, rng=rng, return_log_probs=True,
                 prompt_bucket=prompt_bucket)
  # Every process gets every row (generate's outputs may span processes' devices).
  tokens, lengths, log_probs = (np.asarray(multihost_utils.process_allgather(a, tiled=True))
                                for a in (out.tokens, out.lengths, out.log_probs))
  return Rollout(rows, tokens, lengths, log_probs, group_size)


def to_batch(ro: Rollout, seq_len: int, pad_id: int = 0) -> dict:
  """The train-step batch of a rollout: ``inputs``/``targets`` [N, T] int32, ``mask`` [N, T]
  (1 on completion targets), ``token_mask`` [N, T] (1 on every real input token),
  ``old_log_probs`` [N, T] float32 (module doc). Raises ValueError when a prompt plus its
  completion does not fit ``seq_len`` + 1 tokens, naming the row and the fix."""
  n = len(ro.prompts)
  inputs = np.full((n, seq_len), pad_id, np.int32)
  targets = np.full((n, seq_len), pad_id, np.int32)
  mask = np.zeros((n, seq_len), np.float32)
  token_mask = np.zeros((n, seq_len), np.float32)
  old = np.zeros((n, seq_len), np.float32)
  for r, prompt in enumerate(ro.prompts):
    length = int(ro.lengths[r])
    seq = np.asarray(list(prompt) + ro.tokens[r, :length].tolist(), np.int32)
    if len(seq) - 1 > seq_len:
      raise ValueError(f"row {r}: prompt ({len(prompt)} tokens) + completion ({length}) needs "
                       f"seq_len >= {len(seq) - 1}, got {seq_len}; raise the sequence length "
                       "or lower max_new_tokens")
    inputs[r, :len(seq) - 1], targets[r, :len(seq) - 1] = seq[:-1], seq[1:]
    token_mask[r, :len(seq) - 1] = 1.0
    start = len(prompt) - 1
    mask[r, start:start + length] = 1.0
    old[r, start:start + length] = ro.log_probs[r, :length]
  return {"inputs": inputs, "targets": targets, "mask": mask, "token_mask": token_mask,
          "old_log_probs": old}


def take_groups(ro: Rollout, groups: Sequence[int]) -> Rollout:
  """The rollout of the given prompt groups only (group g = rows g*G .. g*G + G - 1)."""
  g = ro.group_size
  rows = np.asarray([i * g + j for i in groups for j in range(g)], np.int64)
  return Rollout([ro.prompts[r] for r in rows], ro.tokens[rows], ro.lengths[rows],
                 ro.log_probs[rows], g)


def concat_rollouts(rollouts: Sequence[Rollout]) -> Rollout:
  """Rows of several rollouts with the same G and completion budget, in order."""
  return Rollout([p for ro in rollouts for p in ro.prompts],
                 np.concatenate([ro.tokens for ro in rollouts]),
                 np.concatenate([ro.lengths for ro in rollouts]),
                 np.concatenate([ro.log_probs for ro in rollouts]), rollouts[0].group_size)


def decode_completions(tokenizer, stop_tokens: Sequence[int], tokens, lengths) -> list[str]:
  """Completion texts of ``tokens`` [N, L] with ``lengths`` [N]; a final stop token ends a
  completion and is not part of its text."""
  texts = []
  for row, n in zip(tokens, lengths):
    ids = [int(t) for t in row[:n]]
    if ids and ids[-1] in stop_tokens:
      ids = ids[:-1]
    texts.append(tokenizer.decode(ids))
  return texts


def greedy_completions(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                       stop_tokens: Sequence[int] = (), pad_id: int = 0, rows: int = 64):
  """Greedy completions of ``prompts``, ``rows`` per ``generate`` call (the last call padded
  with copies of its last prompt, so one shape is compiled). Returns (tokens [N, L] int32,
  lengths [N]) as NumPy arrays."""
  tokens, lengths = [], []
  for start in range(0, len(prompts), rows):
    chunk = [list(p) for p in prompts[start:start + rows]]
    out = generate(model, chunk + [chunk[-1]] * (rows - len(chunk)),
                   max_new_tokens=max_new_tokens, sampling=SamplingConfig(temperature=0.0),
                   stop_tokens=stop_tokens, pad_id=pad_id, prompt_bucket=16)
    t, n = (np.asarray(multihost_utils.process_allgather(a, tiled=True))[:len(chunk)]
            for a in out[:2])
    tokens.append(t)
    lengths.append(n)
  return np.concatenate(tokens), np.concatenate(lengths)
