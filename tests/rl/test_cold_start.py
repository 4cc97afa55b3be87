"""Cold-start chain-of-thought records: deterministic, correct and well-formed by the rule
rewards, and the written-out column steps really compute the answer."""

import re

import pytest

from deepseek_jax.rl.cold_start import (addition_steps, cold_start_records, multiplication_steps,
                                        subtraction_steps)
from deepseek_jax.rl.rewards import accuracy_reward, format_reward


def _written(steps: str) -> int:
  """The number the column steps write (digits least significant first, then a final carry)."""
  carry = re.search(r"Write the last carry (\d)", steps)
  digits = [int(d) for d in re.findall(r", write (\d)", steps)]
  if carry:
    digits.append(int(carry.group(1)))
  return int("".join(map(str, reversed(digits))))


def test_every_record_is_correct_and_in_r1_format():
  records = cold_start_records(400, seed=3)
  assert records == cold_start_records(400, seed=3) != cold_start_records(400, seed=4)
  assert {r["kind"] for r in records} == {"add", "sub", "mul", "fact"}
  for r in records:
    assert format_reward(r, r["response"]) == 1.0, r
    assert accuracy_reward(r, r["response"]) == 1.0, r
    if r["kind"] != "fact":
      a, op, b = re.fullmatch(r"(\d+) ([-+*]) (\d+) =", r["prompt"]).groups()
      assert r["answer"] == eval(f"{a} {op} {b}")


@pytest.mark.parametrize("a, b", [(0, 0), (7, 5), (17, 25), (99, 1), (999, 999), (40, 5)])
def test_addition_steps_write_the_sum_column_by_column(a, b):
  steps = addition_steps(a, b)
  assert _written(steps) == a + b and steps.endswith(f"So {a} + {b} = {a + b}.")


@pytest.mark.parametrize("a, b", [(0, 0), (42, 17), (100, 99), (1000, 1), (73, 73), (90, 9)])
def test_subtraction_steps_write_the_difference_with_borrows(a, b):
  steps = subtraction_steps(a, b)
  assert _written(steps) == a - b and steps.endswith(f"So {a} - {b} = {a - b}.")
  with pytest.raises(ValueError, match="a >= b"):
    subtraction_steps(3, 5)


def test_multiplication_is_repeated_addition():
  assert multiplication_steps(12, 3) == "12 * 3 is 3 times 12: 12, 24, 36. So 12 * 3 = 36."
  assert multiplication_steps(5, 0).endswith("So 5 * 0 = 0.")
  with pytest.raises(ValueError, match="one-digit"):
    multiplication_steps(5, 12)


def test_fact_answers_quote_the_sentence_the_corpus_states():
  from deepseek_jax.train.corpus import generate_corpus
  text = "\n".join(generate_corpus(3000))
  for r in cold_start_records(40, kinds=("fact",), seed=1):
    quoted = re.search(r'says: "(.*?)"', r["response"]).group(1)
    assert quoted in text and str(r["answer"]) in quoted


def test_excluded_prompts_never_appear():
  from deepseek_jax.rl.tasks import arithmetic_records, fact_records
  held_out = {r["prompt"] for r in arithmetic_records("eval") + fact_records("eval")}
  records = cold_start_records(400, seed=0, max_operand=9, exclude=held_out)
  assert len(records) == 400 and not {r["prompt"] for r in records} & held_out
  assert {r["prompt"] for r in records} - held_out  # the training prompts are used
  with pytest.raises(ValueError, match="every fact question is excluded"):
    cold_start_records(4, exclude={r["prompt"] for r in fact_records("train") + fact_records(
        "eval")})
