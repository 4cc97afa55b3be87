"""Prompt sets for RL from rule rewards: records ``{"prompt": str, "answer": str | number}``.

``arithmetic_records`` is the embedded task: every single-operation problem ``"a op b ="`` over
a range of operands, written exactly as the embedded corpus writes its arithmetic lines
(``train/corpus.py``: ``"12 + 7 = 19"``; subtraction never goes negative), so a model
pretrained on the corpus knows the format (answer, then a newline) but not yet the sums. The
problems are split once, by a seeded shuffle, into a training set and a held-out set that
GRPO never samples: held-out accuracy measures what RL taught, not what it memorised.

``fact_records`` are the corpus world's questions (``"Q: Where does Mia live?\\nA:"``, answer
``"Oakridge"``), split the same way; the R1 pipeline (``rl/pipeline.py``) uses both kinds.
``prompt_ids`` gives a prompt's token ids, raw or in the SFT chat template.

``jsonl_records`` reads a user's prompt file (one JSON object per line with ``prompt`` and
``answer``), checking every line before anything is compiled.
"""

from __future__ import annotations

import random
from typing import Sequence

from deepseek_jax.train.corpus import world
from deepseek_jax.train.sft import chat_context, read_jsonl

SPLITS = ("train", "eval")
OPS = "+-*"


def _result(a: int, op: str, b: int) -> int:
  return a + b if op == "+" else a - b if op == "-" else a * b


KIND_OF_OP = {"+": "add", "-": "sub", "*": "mul"}
# Questions about the corpus world (train/corpus.py), each with the profile sentence that
# states the answer and the field that is the answer.
FACT_TEMPLATES = (
    ("Where does {name} live?", "{name} lives in {town}.", "town"),
    ("What pet does {name} have?", "{name} has a {pet} named {pet_name}.", "pet"),
    ("How old is {name}?", "{name} is {age} years old.", "age"),
    ("What is {name}'s job?", "{He} works as a {job}.", "job"),
    ("What colour does {name} like?", "{His} favourite colour is {color}.", "color"),
)


def _split(items: list, split: str, eval_fraction: float, seed: int, field: str) -> list:
  """The ``split`` part of ``items`` after a ``seed``-ed shuffle (the first ``eval_fraction``
  is "eval"). Raises ValueError for an unknown split or a fraction that empties a split."""
  if split not in SPLITS:
    raise ValueError(f"task split must be one of {SPLITS}, got {split!r}")
  items = list(items)
  random.Random(seed).shuffle(items)
  n_eval = round(eval_fraction * len(items))
  if not 0 < n_eval < len(items):
    raise ValueError(f"{field}={eval_fraction} holds out {n_eval} of {len(items)} problems; "
                     "choose a fraction that leaves both splits non-empty")
  return items[:n_eval] if split == "eval" else items[n_eval:]


def arithmetic_records(split: str = "train", *, ops: str = "+-*", max_operand: int = 9,
                       eval_fraction: float = 0.2, seed: int = 0) -> list[dict]:
  """The problems ``"a op b ="`` for 0 <= a, b <= ``max_operand`` and op in ``ops`` (a >= b
  for "-"), answer the integer result, ``kind`` add / sub / mul, split ``train`` / ``eval``
  (the first ``eval_fraction`` of a ``seed``-ed shuffle is held out). Same arguments, same
  records, on every host.

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
  chosen = _split(problems, split, eval_fraction, seed, "config.task.eval_fraction")
  return [{"prompt": f"{a} {op} {b} =", "answer": _result(a, op, b), "kind": KIND_OF_OP[op]}
          for a, op, b in chosen]


def fact_questions(corpus_seed: int = 0) -> list[dict]:
  """Every ``FACT_TEMPLATES`` question about every person of the corpus world of
  ``corpus_seed``, written as the corpus writes its Q/A pairs: ``{"prompt": "Q: Where does
  Mia live?\nA:", "answer": "Oakridge", "kind": "fact", "source": "Mia lives in
  Oakridge."}`` (``source``: the profile sentence that states the answer)."""
  records = []
  for person in world(corpus_seed):
    for question, sentence, key in FACT_TEMPLATES:
      records.append({"prompt": f"Q: {question.format(**person)}\nA:",
                      "answer": person[key], "kind": "fact",
                      "source": sentence.format(**person)})
  return records


def fact_records(split: str = "train", *, corpus_seed: int = 0, eval_fraction: float = 0.2,
                 seed: int = 0) -> list[dict]:
  """``fact_questions`` split like ``arithmetic_records`` (a ``seed``-ed shuffle, the first
  ``eval_fraction`` held out). Raises ValueError as ``arithmetic_records``."""
  return _split(fact_questions(corpus_seed), split, eval_fraction, seed, "eval_fraction")


def _is_prompt_record(record) -> bool:
  return (isinstance(record, dict) and isinstance(record.get("prompt"), str)
          and bool(record["prompt"]) and "answer" in record)


def jsonl_records(path: str, field: str = "config.task.train_path") -> list[dict]:
  """Records of a JSON-lines file: each line an object with a non-empty string ``prompt`` and
  an ``answer`` (string or number); other fields are kept (rewards may read them). Raises
  FileNotFoundError, or ValueError naming the file and line of the first bad record."""
  return read_jsonl(path, _is_prompt_record, "each line needs a non-empty string 'prompt' and "
                    "an 'answer'", "prompt file", field)


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
    return jsonl_records(path, f"config.task.{'train' if split == 'train' else 'eval'}_path")
  raise ValueError(f"config.task.source must be 'arithmetic' or 'jsonl', got {task.source!r}")


def prompt_ids(prompt: str, tokenizer, chat_template: bool = False) -> list[int]:
  """What the policy is given: ``<bos> prompt`` (a base model continues the text), or with
  ``chat_template`` the SFT chat context ``<bos> <|User|> prompt <|Assistant|>``
  (``train.sft.chat_context``)."""
  if chat_template:
    return chat_context(prompt, tokenizer)
  bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
  return bos + tokenizer.encode(prompt)


def encode_prompts(records: Sequence[dict], tokenizer, *, budget: int, fix: str,
                   chat_template: bool = False) -> list[list]:
  """``prompt_ids`` of each record's prompt. Raises ValueError naming the first prompt longer
  than ``budget`` tokens and the longest prompt (``fix`` says what to change, e.g. the config
  fields), before anything is compiled."""
  encoded = [prompt_ids(record["prompt"], tokenizer, chat_template) for record in records]
  longest = max((len(ids) for ids in encoded), default=0)
  for i, (record, ids) in enumerate(zip(records, encoded)):
    if len(ids) > budget:
      text = record["prompt"]
      shown = repr(text if len(text) <= 60 else text[:57] + "...")
      raise ValueError(f"prompt {i} ({shown}) has {len(ids)} tokens but only {budget} fit "
                       f"(the longest prompt has {longest}); {fix}")
  return encoded
