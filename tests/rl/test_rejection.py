"""Rejection sampling keeps exactly the correct, well-formed, distinct completions, capped per
prompt, and counts acceptance per prompt kind (a stub policy's known outputs)."""

import pytest

from deepseek_jax.rl.rejection import accept
from deepseek_jax.rl.rewards import combine

GOOD = "<think>3 + 4 is 7.</think><answer>7</answer>"


def test_only_correct_well_formed_distinct_completions_are_kept_and_capped():
  reward = combine({"accuracy": 1.0, "format": 1.0})
  add = {"prompt": "3 + 4 =", "answer": 7, "kind": "add"}
  fact = {"prompt": "Q: Where does Mia live?\nA:", "answer": "Oakridge", "kind": "fact"}
  rows = [
      (add, GOOD),                                            # kept
      (add, "<think>3 + 4 is 7.</think>  <answer>7</answer>"),  # kept (another text)
      (add, " " + GOOD + "\n"),                               # duplicate after normalising
      (add, "<think>3 + 4 is 8.</think><answer>8</answer>"),    # wrong
      (add, "<answer>7</answer>"),                            # right but no think: bad format
      (add, "<think>sum</think><answer>7</answer>"),            # passes; over the cap of 2
      (fact, "<think>The profile says so.</think><answer>oakridge.</answer>"),  # kept
      (fact, "Oakridge"),                                     # no format
  ]
  records, completions = zip(*rows)
  kept, stats = accept(records, completions, reward, {"accuracy": 1.0, "format": 1.0},
                       per_prompt=2)
  assert [k["response"] for k in kept] == [GOOD, completions[1], completions[6]]
  assert all(k["kind"] in ("add", "fact") and k["prompt"] for k in kept)
  assert (stats.sampled["add"], stats.passed["add"], stats.kept["add"]) == (6, 4, 2)
  assert (stats.sampled["fact"], stats.passed["fact"], stats.kept["fact"]) == (2, 1, 1)
  assert stats.rate("add") == 4 / 6 and stats.prompts_with_one["fact"] == 1
  assert "| add | 6 | 4 | 66.7% | 2 | 1/1 |" in stats.table()


def test_a_threshold_on_a_reward_not_computed_is_refused():
  with pytest.raises(ValueError, match=r"thresholds name \['language'\]"):
    accept([{"prompt": "p", "answer": 1}], ["1"], combine({"accuracy": 1.0}), {"language": 0.9})
