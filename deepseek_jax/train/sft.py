"""Supervised fine-tuning data: prompt/response records -> token ids with a response-only mask.

A record is one JSON object per line: ``prompt`` and ``response`` (non-empty strings) and an
optional ``system``. The chat template is DeepSeek-V3/R1's, with its role tokens registered as
special tokens of the tokenizer (one id each, never produced by encoding text):

    <bos> system <|User|> prompt <|Assistant|> response <eos>

The loss is next-token cross-entropy on the response and its <eos> only: ``loss_mask`` [T] is 1
exactly where the *target* is a response token or the final <eos>, so the prompt, the system
text and the role tokens are context, never targets (MTP depths shift this mask with their
targets, so they skip the prompt alike). Packed rows keep records apart: each record is one
segment, and attention and MTP never cross segments (``data.make_dataset`` with
``data.source="sft"``).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

USER, ASSISTANT = "<|User|>", "<|Assistant|>"
ROLE_TOKENS = (USER, ASSISTANT)


def read_jsonl(path: str, valid, needs: str, what: str, field: str) -> list[dict]:
  """The objects of a JSON-lines file (blank lines skipped) for which ``valid(obj)`` holds.
  Raises FileNotFoundError ("{what} {path} does not exist ({field})", ``field`` the config
  field that names the file), or ValueError naming the file and
  line of the first line that is not JSON or not valid ("{path}:{line}: {needs}; got ..."),
  or of an empty file."""
  if not path:
    raise FileNotFoundError(f"no {what} given ({field} is empty)")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path} does not exist ({field})")
  records = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line.rstrip("\r\n"))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not JSON ({e.msg} at column {e.colno}); one "
                         "object per line") from None
      if not valid(record):
        raise ValueError(f"{path}:{number}: {needs}; got {line.strip()[:120]}")
      records.append(record)
  if not records:
    raise ValueError(f"{path} holds no records; one JSON object per line")
  return records


def _is_sft_record(record) -> bool:
  return (isinstance(record, dict)
          and all(isinstance(record.get(k), str) and record[k] for k in ("prompt", "response"))
          and isinstance(record.get("system", ""), str))


def read_records(path: str, field: str = "config.data.sft_path") -> list[dict]:
  """The SFT records of a JSON-lines file. Raises FileNotFoundError, or ValueError naming the
  file and line of the first record that is not an object with non-empty string ``prompt``
  and ``response`` (and, if present, a string ``system``)."""
  return read_jsonl(path, _is_sft_record, "an SFT record needs non-empty string 'prompt' and "
                    "'response' (and an optional string 'system')", "SFT file", field)


def encode_record(record: dict, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(ids [L] int32, loss_mask [L - 1] float32) of one record in the chat template (module
  doc): ``loss_mask[t]`` is 1 when ``ids[t + 1]`` is a response token or the final <eos>.
  Raises ValueError when the tokenizer has no id for a role token."""
  eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  context = chat_context(record["prompt"], tokenizer, record.get("system", ""))
  answer = tokenizer.encode(record["response"]) + eos
  ids = np.asarray(context + answer, np.int32)
  mask = np.zeros(len(ids) - 1, np.float32)
  mask[len(context) - 1:] = 1.0  # targets ids[len(context):], the response and <eos>
  return ids, mask


def chat_context(prompt: str, tokenizer, system: str = "") -> list[int]:
  """Token ids of ``<bos> system <|User|> prompt <|Assistant|>``: what a chat model is given
  to answer ``prompt`` (SFT records, RL prompts and samples of a fine-tuned model). Raises
  ValueError when the tokenizer has no id for a role token."""
  user, assistant = (role_id(tokenizer, name) for name in ROLE_TOKENS)
  bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
  return bos + tokenizer.encode(system) + [user] + tokenizer.encode(prompt) + [assistant]


def role_id(tokenizer, name: str) -> int:
  """The id of role token ``name`` in ``tokenizer`` (its ``special_tokens`` mapping). Raises
  ValueError naming the token when the tokenizer has none."""
  specials: Optional[dict] = getattr(tokenizer, "special_tokens", None)
  if not specials or name not in specials:
    raise ValueError(f"the tokenizer has no id for the chat role token {name!r}; SFT needs "
                     f"{list(ROLE_TOKENS)} registered as special tokens")
  return specials[name]
