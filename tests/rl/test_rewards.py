"""Rule rewards (R1 §2.2.2): answer extraction, accuracy, format, language, weighted sums."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepseek_jax.rl import rewards as rw
from deepseek_jax.rl.rewards import (REWARDS, RewardError, WeightedReward, accuracy_reward,
                                     combine, extract_answer, format_reward,
                                     language_consistency_reward)

GOOD = "<think>2 + 2 is 4</think>\n<answer>4</answer>"


# --- extract_answer ---------------------------------------------------------------------------

@pytest.mark.parametrize("completion, marker, expected", [
    ("<think>x</think><answer> 42 </answer>", None, "42"),
    ("<answer>1</answer> then <answer>2</answer>", None, "2"),  # the last one counts
    ("<answer>outer <answer>inner</answer></answer>", None, "inner"),  # nested: innermost
    ("<answer>1</answer> <answer>2", None, "1"),  # an unclosed tag is no answer
    ("so #### 7 and then #### 8\nbye", "####", "8"),  # last marker, rest of its line
    ("Q: what? A: Paris", "A:", "Paris"),
    ("<answer>tagged</answer> A: marker", "A:", "tagged"),  # tags win over the marker
    ("no answer here", "####", None),
    ("no answer here", None, None),
    ("<answer>  </answer>", None, None),  # empty answer
    ("ends with ####", "####", None),
    ("", None, None),
])
def test_extract_answer_takes_the_last_answer_tag_then_the_marker(completion, marker, expected):
  assert extract_answer(completion, marker) == expected


# --- accuracy_reward ----------------------------------------------------------------------------

@pytest.mark.parametrize("predicted, reference", [
    ("1,234", "1234"), ("+42", 42), ("007", "7"), ("42.", "42"), (" -5 ", -5),
    ("1,234,567", 1234567), ("3", 3.0),
    ("  The   EIFFEL tower. ", "the eiffel tower"), ('"Paris"', "paris"), ("(b)", "B"),
    ("“Paris!”", "Paris"),
])
def test_accuracy_reward_matches_integers_and_normalised_text(predicted, reference):
  record = {"answer": reference}
  assert accuracy_reward(record, f"<think>t</think><answer>{predicted}</answer>") == 1.0


@pytest.mark.parametrize("predicted, reference", [
    ("43", "42"), ("1,23", "123"), ("1,2345", "12345"), ("4.5", "45"), ("-5", "5"),
    ("42.0", "42"), ("paris france", "paris"), ("", "0"),
])
def test_accuracy_reward_rejects_near_misses(predicted, reference):
  assert accuracy_reward({"answer": reference}, f"<answer>{predicted}</answer>") == 0.0


def test_accuracy_reward_uses_the_last_answer_the_key_and_the_marker():
  record = {"answer": "1", "gold": "2"}
  assert accuracy_reward(record, "<answer>2</answer><answer>1</answer>") == 1.0
  assert accuracy_reward(record, "<answer>1</answer><answer>2</answer>") == 0.0
  assert accuracy_reward(record, "<answer>2</answer>", answer_key="gold") == 1.0
  assert accuracy_reward(record, "so the answer is\n#### 1", marker="####") == 1.0
  assert accuracy_reward(record, "so the answer is\n#### 1") == 0.0  # no marker, no answer
  assert accuracy_reward(record, "") == 0.0


def test_accuracy_reward_names_a_missing_answer_key_and_the_record():
  record = {"question": "q" * 500}
  with pytest.raises(ValueError, match="'answer'") as info:
    accuracy_reward(record, "<answer>1</answer>")
  message = str(info.value)
  assert "\n" not in message and "question" in message and len(message) < 400
  with pytest.raises(ValueError, match="must be a str or a number"):
    accuracy_reward({"answer": None}, "<answer>1</answer>")


# --- format_reward ------------------------------------------------------------------------------

@pytest.mark.parametrize("completion", [
    GOOD,
    "<think>a</think><answer>b</answer>",
    "  \n<think>\nmulti\nline\n</think>  \n\n <answer>b</answer>\n  ",
    "<think></think><answer></answer>",  # contents are not judged
])
def test_format_reward_accepts_think_then_answer(completion):
  assert format_reward({}, completion) == 1.0


@pytest.mark.parametrize("completion", [
    "",
    "<answer>b</answer><think>a</think>",  # wrong order
    "<think>a</think>",  # no answer
    "<answer>b</answer>",  # no think
    "<think>a</think><think>a</think><answer>b</answer>",  # duplicated think
    "<think>a</think><answer>b</answer><answer>c</answer>",  # duplicated answer
    "<think>a<answer>b</answer></think>",  # answer nested in think
    "<think>a</think>between<answer>b</answer>",  # text between the parts
    "preamble <think>a</think><answer>b</answer>",  # text before
    "<think>a</think><answer>b</answer> trailing",  # text after </answer>
    "<think>a</answer><answer>b</think>",  # crossed closing tags
    "<THINK>a</THINK><ANSWER>b</ANSWER>",  # tags are case-sensitive
])
def test_format_reward_rejects_anything_else(completion):
  assert format_reward({}, completion) == 0.0


def test_format_reward_allows_one_given_end_of_sequence_marker():
  eos = "<|end_of_sentence|>"
  assert format_reward({}, GOOD + eos) == 0.0
  assert format_reward({}, GOOD + eos, eos=eos) == 1.0
  assert format_reward({}, GOOD + " " + eos + "\n", eos=eos) == 1.0
  assert format_reward({}, GOOD, eos=eos) == 1.0  # optional
  assert format_reward({}, GOOD + eos + eos, eos=eos) == 0.0


# --- language_consistency_reward ----------------------------------------------------------------

def test_language_consistency_is_the_fraction_of_letters_in_the_target_script():
  mixed = "<think>abcd 1234 + 中文</think><answer>x</answer>"  # 4 latin, 2 han; digits ignored
  assert language_consistency_reward({}, mixed) == pytest.approx(4 / 6)
  assert language_consistency_reward({}, mixed, script="cjk") == pytest.approx(2 / 6)
  assert language_consistency_reward({}, mixed, script="cyrillic") == 0.0
  assert language_consistency_reward({}, "<think>Ça déjà vu</think>") == 1.0  # accents are latin


@pytest.mark.parametrize("text, script", [
    ("思考ひらがなカタカナ한국어", "cjk"), ("Привет мир", "cyrillic"), ("مرحبا بالعالم", "arabic"),
    ("ｆｕｌｌｗｉｄｔｈ", "latin"),
])
def test_language_consistency_knows_each_script(text, script):
  assert language_consistency_reward({}, f"<think>{text}</think>", script=script) == 1.0
  other = "latin" if script != "latin" else "cjk"
  assert language_consistency_reward({}, f"<think>{text}</think>", script=other) == 0.0


def test_language_consistency_edge_cases():
  assert language_consistency_reward({}, "") == 0.0  # no think part
  assert language_consistency_reward({}, "<answer>english</answer>") == 0.0
  assert language_consistency_reward({}, "<think></think><answer>x</answer>") == 1.0  # no letters
  assert language_consistency_reward({}, "<think>1 + 1 = 2</think>") == 1.0
  # only the think part counts, not the answer
  assert language_consistency_reward({}, "<think>abc</think><answer>中文</answer>") == 1.0
  with pytest.raises(ValueError, match="unknown script 'klingon'.*latin"):
    language_consistency_reward({}, GOOD, script="klingon")


# --- WeightedReward / combine -------------------------------------------------------------------

def test_weighted_reward_sums_weighted_components_and_reports_each():
  spec = WeightedReward({"acc": (accuracy_reward, 1.0), "fmt": (format_reward, 0.5)})
  records = [{"answer": "4"}, {"answer": "5"}, {"answer": "4"}]
  completions = [GOOD, GOOD, "<answer>4</answer>"]
  total, parts = spec(records, completions)
  assert total.dtype == np.float32 and total.shape == (3,)
  np.testing.assert_array_equal(parts["acc"], [1.0, 0.0, 1.0])
  np.testing.assert_array_equal(parts["fmt"], [1.0, 1.0, 0.0])
  np.testing.assert_allclose(total, [1.5, 0.5, 1.0])
  assert all(p.dtype == np.float32 for p in parts.values())


def test_a_raising_reward_becomes_a_reward_error_naming_component_index_and_record():
  def broken(record, completion):
    raise ZeroDivisionError("boom\nsecond line")

  spec = WeightedReward({"fmt": (format_reward, 1.0), "broken": (broken, 1.0)})
  records = [{"answer": "1"}, {"answer": "2", "id": "row-7", "text": "x" * 1000}]
  with pytest.raises(RewardError) as info:
    spec(records, [GOOD, GOOD])
  message = str(info.value)
  assert isinstance(info.value, ValueError)
  assert "'broken'" in message and "record 0" in message and "ZeroDivisionError: boom" in message
  assert "\n" not in message and len(message) < 400
  assert isinstance(info.value.__cause__, ZeroDivisionError)
  # a record-specific failure names that record
  with pytest.raises(RewardError, match=r"record 1 .*'row-7'"):
    WeightedReward({"acc": (accuracy_reward, 1.0)})([{"answer": "1"}, {"id": "row-7"}],
                                                     [GOOD, GOOD])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "1.0", None, [1.0], True])
def test_a_non_finite_or_non_number_reward_is_refused(value):
  spec = WeightedReward({"bad": (lambda record, completion: value, 1.0)})
  with pytest.raises(RewardError, match="'bad' returned .* record 0"):
    spec([{"answer": "1"}], [GOOD])


def test_numpy_scalars_are_numbers():
  spec = WeightedReward({"np": (lambda record, completion: np.float32(0.25), 2.0)})
  total, _ = spec([{}], [""])
  assert total[0] == 0.5


@pytest.mark.parametrize("components, match", [
    ({}, "no components"),
    ({"acc": (accuracy_reward, math.nan)}, "finite"),
    ({"acc": (accuracy_reward, math.inf)}, "finite"),
    ({"acc": (accuracy_reward, "1")}, "finite"),
    ({"acc": accuracy_reward}, r"\(reward_fn, weight\)"),
    ({"acc": ("accuracy", 1.0)}, r"\(reward_fn, weight\)"),
])
def test_weighted_reward_refuses_bad_specs(components, match):
  with pytest.raises(ValueError, match=match):
    WeightedReward(components)


def test_weighted_reward_refuses_mismatched_lengths():
  with pytest.raises(ValueError, match="2 records but 1 completions"):
    WeightedReward({"fmt": (format_reward, 1.0)})([{}, {}], [GOOD])


def test_combine_builds_a_weighted_reward_from_registry_names():
  assert set(REWARDS) == {"accuracy", "format", "language"}
  spec = combine({"accuracy": 1.0, "format": {"weight": 0.5, "eos": "</s>"},
                  "language": {"weight": 0.1, "script": "cjk"}})
  total, parts = spec([{"answer": "4"}], ["<think>中文ab</think><answer>4</answer></s>"])
  assert parts["format"][0] == 1.0 and parts["language"][0] == pytest.approx(0.5)
  assert total[0] == pytest.approx(1.0 + 0.5 + 0.05)
  with pytest.raises(ValueError, match="unknown reward 'acuracy'.*'accuracy'"):
    combine({"acuracy": 1.0})
  with pytest.raises(ValueError, match="needs a 'weight'"):
    combine({"language": {"script": "cjk"}})


def test_normalize_text_strips_only_the_edges():
  assert rw.normalize_text("  ¿Qué   tal?  ") == "qué tal"
  assert rw.normalize_text("'a.b'") == "a.b"
  assert rw.normalize_text("...") == ""


def test_first_line_accuracy_reads_a_direct_completion():
  from deepseek_jax.rl.rewards import accuracy_reward
  record = {"answer": 7}
  assert accuracy_reward(record, " 7", first_line=True) == 1.0
  assert accuracy_reward(record, " 7\n8 + 1 = 9", first_line=True) == 1.0
  assert accuracy_reward(record, " 17", first_line=True) == 0.0
  assert accuracy_reward(record, " 7", first_line=False) == 0.0  # no tags, no marker
  assert accuracy_reward(record, "<answer>8</answer>", first_line=True) == 0.0  # tags win
  assert accuracy_reward(record, "", first_line=True) == 0.0


def test_overlong_penalty_is_dapo_eq_13_by_hand():
  from deepseek_jax.rl.rewards import overlong_penalty
  # L_max 10, L_cache 4: free up to 6, then -(|o| - 6) / 4, and -1 past 10.
  got = overlong_penalty([3, 6, 7, 8, 10, 11], max_length=10, buffer=4)
  np.testing.assert_allclose(got, [0, 0, -0.25, -0.5, -1.0, -1.0])
  np.testing.assert_allclose(overlong_penalty([7, 10], 10, 4, penalty=0.5), [-0.125, -0.5])
  assert not overlong_penalty([10], 10, 0).any()
  with pytest.raises(ValueError, match="overlong buffer"):
    overlong_penalty([1], 10, 11)


def test_reward_errors_name_the_label_the_caller_gives():
  reward = WeightedReward({"acc": (accuracy_reward, 1.0)})
  with pytest.raises(RewardError, match=r"failed on training record 17 \(sample 2\)"):
    reward([{"prompt": "x"}], ["1"], ["training record 17 (sample 2)"])
