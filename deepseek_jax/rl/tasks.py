"""Prompt sets for RL from rule rewards: records ``{"prompt": str, "answer": str | number}``.

``arithmetic_records`` is the embedded task: every single-operation problem ``"a op b ="`` over
a range of operands, written exactly as the embedded corpus writes its arithmetic lines
(``train/corpus.py``: ``"12 + 7 = 19"``; subtraction never goes negative), so a model
pretrained on the corpus knows the format (answer, then a newline) but not yet the sums. The
problems are split once, by a seeded shuffle, into a training set and a held-out set that
GRPO never samples: held-out accuracy measures what RL taught, not what it memorised.

``jsonl_records`` reads a user's prompt file (one JSON object per line with ``prompt`` and
``answer``), checking every line before anything is compiled.
"""

from __future__ import annotations

import random
from typing import Sequence

from deepseek_jax.train.sft import read_jsonl

SPLITS = ("train", "eval")
OPS = "+-*"


def _result(a: int, op: str, b: int) -> int:
  return a + b if op == "+" else a - b if op == "-" else a * b


def arithmetic_records(split: str = "train", *, ops: str = "+-*", max_operand: int = 9,
                       eval_fraction: float = 0.2, seed: int = 0) -> list[dict]:
  """The problems ``"a op b ="`` for 0 <= a, b <= ``max_operand`` and op in ``ops`` (a >= b
  for "-"), answer the integer result, split ``train`` / ``eval`` (the first ``eval_fraction``
  of a ``seed``-ed shuffle is held out). Same arguments, same records, on every host.

  Raises ValueError for an unknown split or op, max_operand < 1, or an eval fraction outside
  (0, 1) that would leave a split empty.
  """
  if split not in SPLITS:
    raise ValueError(f"task split must be one of {SPLITS}, got {split!r}")
  if not ops or any(op not in OPS for op in ops):
    raise ValueError(f"config.task.ops: use some of {OPS!r}, got {ops!r}")
  if max_operand < 1:
    raise ValueError(f"config.task.max_operand must be >= 1, got {max_operand}")
  problems = [(a, op, b) for op in dict.fromkeys(ops) for a in range(max_operand + 1)
              for b in range(max_operand + 1) if op != "-" or a >= b]
  random.Random(seed).shuffle(problems)
  n_eval = round(eval_fraction * len(problems))
  if not 0 < n_eval < len(problems):
    raise ValueError(f"config.task.eval_fraction={eval_fraction} holds out {n_eval} of "
                     f"{len(problems)} problems; choose a fraction that leaves both splits "
                     "non-empty")
  chosen = problems[:n_eval] if split == "eval" else problems[n_eval:]
  return [{"prompt": f"{a} {op} {b} =", "answer": _result(a, op, b)} for a, op, b in chosen]


def _is_prompt_record(record) -> bool:
  return (isinstance(record, dict) and isinstance(record.get("prompt"), str)
          and bool(record["prompt"]) and "answer" in record)


def jsonl_records(path: str) -> list[dict]:
  """Records of a JSON-lines file: each line an object with a non-empty string ``prompt`` and
  an ``answer`` (string or number); other fields are kept (rewards may read them). Raises
  FileNotFoundError, or ValueError naming the file and line of the first bad record."""
  return read_jsonl(path, _is_prompt_record, "each line needs a non-empty string 'prompt' and "
                    "an 'answer'", "prompt file")


def task_records(task, split: str) -> list[dict]:
  """The records of ``config.task`` (``source`` "arithmetic" or "jsonl") for ``split``."""
  if task.source == "arithmetic":
    return arithmetic_records(split, ops=task.ops, max_operand=task.max_operand,
                              eval_fraction=task.eval_fraction, seed=task.seed)
  if task.source == "jsonl":
    path = task.train_path if split == "train" else task.eval_path
    if not path:
      raise ValueError(f"config.task.source='jsonl' needs config.task."
                       f"{'train' if split == 'train' else 'eval'}_path")
    return jsonl_records(path)
  raise ValueError(f"config.task.source must be 'arithmetic' or 'jsonl', got {task.source!r}")


def encode_prompts(records: Sequence[dict], tokenizer, *, budget: int, fix: str) -> list[list]:
  """Token ids of each record's prompt (bos first when the tokenizer has one). Raises
  ValueError naming the first prompt longer than ``budget`` tokens and the longest prompt
  (``fix`` says what to change, e.g. the config fields), before anything is compiled."""
  bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
  encoded = [bos + tokenizer.encode(record["prompt"]) for record in records]
  longest = max((len(ids) for ids in encoded), default=0)
  for i, (record, ids) in enumerate(zip(records, encoded)):
    if len(ids) > budget:
      text = record["prompt"]
      shown = repr(text if len(text) <= 60 else text[:57] + "...")
      raise ValueError(f"prompt {i} ({shown}) has {len(ids)} tokens but only {budget} fit "
                       f"(the longest prompt has {longest}); {fix}")
  return encoded
