"""Cold-start chain-of-thought records for the embedded task family (DeepSeek-R1 §2.3.1).

R1 fine-tunes the base model on a few thousand long chain-of-thought examples before reasoning
RL, so that RL starts from readable reasoning in a fixed format. We cannot ship a model that
writes them, so a rule-based solver does: every record is produced from a seed, and each is
correct and well-formed by construction (``tests/rl/test_cold_start.py`` scores every one
with the rule rewards).

Records are ``{"prompt", "response", "answer", "kind"}``; the response is R1's template
``<think>...</think><answer>...</answer>``:

    "17 + 25 ="  ->  <think>Ones: 7 + 5 = 12, write 2, carry 1. Tens: 1 + 2 + 1 = 4, write 4.
                      So 17 + 25 = 42.</think><answer>42</answer>
    "Q: Where does Mia live?\\nA:"  ->  <think>The profile says: "Mia lives in Oakridge." So
                      the answer is Oakridge.</think><answer>Oakridge</answer>

Kinds: ``add`` and ``sub`` (column arithmetic, carries and borrows written out, operands up to
``max_operand``), ``mul`` (a one-digit factor: repeated addition), ``fact`` (a question about
the corpus world answered by quoting the sentence that states it).
"""

from __future__ import annotations

import random

from deepseek_jax.rl.tasks import fact_questions

KINDS = ("add", "sub", "mul", "fact")


def _digits(n: int) -> list[int]:
  """Least significant first."""
  return [int(d) for d in reversed(str(n))]


PLACES = ("Ones", "Tens", "Hundreds", "Thousands")


def addition_steps(a: int, b: int) -> str:
  """Column addition of non-negative ``a`` + ``b``, one sentence per column, carries named."""
  da, db = _digits(a), _digits(b)
  steps, carry = [], 0
  for i in range(max(len(da), len(db))):
    x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
    total = x + y + carry
    terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
    place = PLACES[i] if i < len(PLACES) else f"Column {i + 1}"
    carry = total // 10
    steps.append(f"{place}: {terms} = {total}, write {total % 10}"
                 + (f", carry {carry}." if carry else "."))
  if carry:
    steps.append(f"Write the last carry {carry}.")
  return " ".join(steps) + f" So {a} + {b} = {a + b}."


def subtraction_steps(a: int, b: int) -> str:
  """Column subtraction ``a`` - ``b`` for a >= b >= 0, borrows named."""
  if a < b or b < 0:
    raise ValueError(f"subtraction_steps needs a >= b >= 0, got {a} - {b}")
  da, db = _digits(a), _digits(b)
  steps, borrow = [], 0
  for i in range(len(da)):
    x, y = da[i] - borrow, (db[i] if i < len(db) else 0)
    place = PLACES[i] if i < len(PLACES) else f"Column {i + 1}"
    shown = f"{da[i]} - {borrow}" if borrow else f"{da[i]}"
    if x < y:
      steps.append(f"{place}: {shown} is less than {y}, borrow 1: {x + 10} - {y} = "
                   f"{x + 10 - y}, write {x + 10 - y}.")
      borrow = 1
    else:
      steps.append(f"{place}: {shown} - {y} = {x - y}, write {x - y}." if not borrow else
                   f"{place}: {shown} = {x}, {x} - {y} = {x - y}, write {x - y}.")
      borrow = 0
  return " ".join(steps) + f" So {a} - {b} = {a - b}."


def multiplication_steps(a: int, b: int) -> str:
  """``a`` * ``b`` with a one-digit ``b`` (0..9) as repeated addition of ``a``."""
  if not 0 <= b <= 9 or a < 0:
    raise ValueError(f"multiplication_steps needs a >= 0 and a one-digit b, got {a} * {b}")
  if b == 0:
    return f"Anything times 0 is 0. So {a} * 0 = 0."
  partial = [a * k for k in range(1, b + 1)]
  return (f"{a} * {b} is {b} times {a}: " + ", ".join(map(str, partial))
          + f". So {a} * {b} = {a * b}.")


def _fact_record(question: dict) -> dict:
  return {"prompt": question["prompt"],
          "response": f"<think>The profile says: \"{question['source']}\" So the answer is "
                      f"{question['answer']}.</think><answer>{question['answer']}</answer>",
          "answer": question["answer"], "kind": "fact"}


def cold_start_records(n: int = 400, *, seed: int = 0, max_operand: int = 99,
                       kinds=KINDS, corpus_seed: int = 0, exclude=()) -> list[dict]:
  """``n`` cold-start records, the kinds in turn, deterministic in ``seed`` (module doc).
  Arithmetic prompts are written as the corpus writes its sums (``"a op b ="``); fact questions
  as its Q/A pairs (``tasks.fact_questions``), about the world of ``corpus_seed``. No record's
  prompt is in ``exclude`` (held-out prompts). Raises ValueError for an unknown kind, n < 1,
  or when ``exclude`` leaves a kind without prompts."""
  unknown = [k for k in kinds if k not in KINDS]
  if unknown or not kinds or n < 1:
    raise ValueError(f"cold_start_records: kinds must be some of {KINDS} and n >= 1, got "
                     f"{list(kinds)}, {n}")
  exclude = set(exclude)
  questions = [q for q in fact_questions(corpus_seed) if q["prompt"] not in exclude]
  if "fact" in kinds and not questions:
    raise ValueError("cold_start_records: every fact question is excluded")
  rng = random.Random(seed)
  records = []
  for i in range(n):
    kind = kinds[i % len(kinds)]
    if kind == "fact":
      records.append(_fact_record(rng.choice(questions)))
      continue
    for _ in range(1000):
      a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
      if kind == "sub":
        a, b = max(a, b), min(a, b)
      elif kind == "mul":
        b = rng.randint(0, 9)
      op = {"add": "+", "sub": "-", "mul": "*"}[kind]
      if f"{a} {op} {b} =" not in exclude:
        break
    else:
      raise ValueError(f"cold_start_records: no {kind} problem with operands up to "
                       f"{max_operand} is left outside `exclude`")
    if kind == "sub":
      steps, answer = subtraction_steps(a, b), a - b
    elif kind == "mul":
      steps, answer = multiplication_steps(a, b), a * b
    else:
      steps, answer = addition_steps(a, b), a + b
    records.append({"prompt": f"{a} {op} {b} =",
                    "response": f"<think>{steps}</think><answer>{answer}</answer>",
                    "answer": answer, "kind": kind})
  return records
