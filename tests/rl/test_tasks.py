"""The embedded arithmetic prompt set and user prompt files."""

import json
import re

import pytest

from deepseek_jax.rl.tasks import arithmetic_records, encode_prompts, jsonl_records
from deepseek_jax.train.corpus import generate_corpus
from deepseek_jax.train.data import ByteTokenizer


def test_arithmetic_splits_are_disjoint_complete_deterministic_and_correct():
  train, held = arithmetic_records("train"), arithmetic_records("eval")
  prompts = [r["prompt"] for r in train + held]
  assert len(set(prompts)) == len(prompts) == 100 + 55 + 100  # +, - (a >= b), *
  assert len(held) == round(0.2 * 255)
  assert train == arithmetic_records("train")  # the same on every host and run
  assert arithmetic_records("eval", seed=1) != held
  for r in train + held:
    a, op, b = re.fullmatch(r"(\d+) ([-+*]) (\d+) =", r["prompt"]).groups()
    assert r["answer"] == eval(f"{a} {op} {b}") >= 0


def test_arithmetic_prompts_are_written_as_the_corpus_writes_its_sums():
  lines = [line for doc in generate_corpus(2000) for line in doc.split("\n")
           if re.fullmatch(r"\d+ [-+*] \d+ = \d+", line)]
  assert lines
  for line in lines[:200]:
    prompt, answer = line.rsplit(" ", 1)
    assert re.fullmatch(r"\d+ [-+*] \d+ =", prompt) and eval(prompt[:-2]) == int(answer)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ops="+/"), "config.task.ops"), (dict(max_operand=0), "max_operand"),
    (dict(eval_fraction=0.0), "eval_fraction"), (dict(eval_fraction=1.0), "eval_fraction")])
def test_bad_arithmetic_settings_name_the_field(kwargs, message):
  with pytest.raises(ValueError, match=message):
    arithmetic_records("train", **kwargs)


def test_a_prompt_file_is_read_and_a_bad_line_is_named(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps({"prompt": "2 + 2 =", "answer": 4, "id": 7}) + "\n\n")
  assert jsonl_records(str(path)) == [{"prompt": "2 + 2 =", "answer": 4, "id": 7}]
  path.write_text(json.dumps({"prompt": "a", "answer": 1}) + "\n" + json.dumps({"q": 1}) + "\n")
  with pytest.raises(ValueError, match=r"p.jsonl:2: each line needs"):
    jsonl_records(str(path))
  path.write_text("{oops\n")
  with pytest.raises(ValueError, match=r"p.jsonl:1: not JSON"):
    jsonl_records(str(path))
  with pytest.raises(FileNotFoundError, match=r"missing.jsonl does not exist \(config.task."):
    jsonl_records(str(tmp_path / "missing.jsonl"))


def test_a_prompt_over_the_budget_is_refused_with_its_index():
  records = [{"prompt": "1 + 1 =", "answer": 2}, {"prompt": "x" * 70, "answer": 0}]
  ids = encode_prompts(records[:1], ByteTokenizer(), budget=8, fix="raise it")
  assert ids == [[1] + ByteTokenizer().encode("1 + 1 =")]
  with pytest.raises(ValueError, match=r"prompt 1 \('x{57}\.\.\.'\) has 71 tokens but only 8 "
                     r"fit \(the longest prompt has 71\); raise it"):
    encode_prompts(records, ByteTokenizer(), budget=8, fix="raise it")


def test_fact_questions_cover_the_world_and_split_like_arithmetic():
  from deepseek_jax.rl.tasks import fact_questions, fact_records
  from deepseek_jax.train.corpus import world
  questions = fact_questions()
  assert len(questions) == 5 * len(world(0))
  for q in questions:
    assert q["prompt"].startswith("Q: ") and q["prompt"].endswith("?\nA:")
    assert str(q["answer"]) in q["source"] and q["kind"] == "fact"
  train, held = fact_records("train"), fact_records("eval")
  assert len(held) == round(0.2 * len(questions)) and not (
      {q["prompt"] for q in train} & {q["prompt"] for q in held})
  assert {r["kind"] for r in arithmetic_records("train")} == {"add", "sub", "mul"}


def test_chat_template_prompts_are_the_sft_context():
  from deepseek_jax.rl.tasks import prompt_ids
  from deepseek_jax.train.sft import ASSISTANT, USER, encode_record
  tok = ByteTokenizer()
  ids = prompt_ids("3 + 4 =", tok, chat_template=True)
  assert ids == [tok.bos_id, tok.special_tokens[USER]] + tok.encode("3 + 4 =") + [
      tok.special_tokens[ASSISTANT]]
  full, mask = encode_record({"prompt": "3 + 4 =", "response": "7"}, tok)
  assert list(full[:len(ids)]) == ids and mask[:len(ids) - 1].sum() == 0
  assert prompt_ids("3 + 4 =", tok) == [tok.bos_id] + tok.encode("3 + 4 =")
  assert encode_prompts([{"prompt": "1 =", "answer": 1}], tok, budget=6, fix="",
                        chat_template=True) == [[1, 259] + tok.encode("1 =") + [260]]
