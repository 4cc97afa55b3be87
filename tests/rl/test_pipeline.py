"""The R1 pipeline (rl/pipeline.py): stage configs, held-out prompts kept out of every training
set, rejection sampling that stops on an empty result, the KL estimate, the table; and one
end-to-end run on the tiny model (every stage, resume/skip, subsets, the empty-rejection stop)."""

import json
import os

import numpy as np
import pytest

from deepseek_jax.rl import pipeline
from deepseek_jax.rl.rewards import accuracy_reward, combine, format_reward
from deepseek_jax.train import config as train_config
from deepseek_jax.train import trainer


def _config(base="/tmp/base", **pipe):
  c = pipeline.default_config()
  c.model.preset = "tiny"
  c.model.overrides.vocab_size = 320
  c.model.overrides.init_std = 0.1
  c.init_from = base
  c.checkpoint.async_save = False
  c.metrics.tensorboard = False
  c.optimizer.learning_rate = 1e-3
  c.train.seq_len = 44
  c.rl.max_new_tokens = 8
  c.rl.prompts_per_step = 4
  c.rl.group_size = 2
  c.rl.eval_every = 0
  c.rl.eval_prompts = 4
  p = c.pipeline
  p.seeds = "0"
  p.max_operand = 3
  p.cold_start_records = 24
  p.cold_start_max_operand = 9
  p.sft_steps = 2
  p.sft_batch_size = 8
  p.sft_seq_len = 160
  p.reasoning_rl_steps = p.all_rl_steps = p.r1_zero_steps = 2
  p.rejection_samples = 2
  p.qa_records = 4
  p.kl_samples = 2
  p.update(pipe)
  return c


def test_stage_configs_chain_the_stages_and_pass_their_runners_checks(tmp_path):
  c = _config()
  seed_dir = str(tmp_path / "seed3")
  sft = pipeline.stage_config(c, "cold_start_sft", seed_dir, 3)
  assert sft.data.source == "sft" and sft.train.init_from == "/tmp/base" and sft.seed == 3
  assert sft.data.sft_path.endswith("data/cold_start.jsonl") and sft.sample.chat_template
  assert sft.model.overrides.vocab_size == 320 and sft.train.steps == 2
  rej = pipeline.stage_config(c, "rejection_sft", seed_dir, 3)
  assert rej.train.init_from == "/tmp/base"  # R1 §2.3.3: stage 3 fine-tunes the base
  assert rej.data.sft_path.endswith("data/rejection_sft.jsonl")
  rl = pipeline.stage_config(c, "reasoning_rl", seed_dir, 3)
  assert rl.init_from == os.path.join(seed_dir, "cold_start_sft") and rl.task.chat_template
  assert rl.task.train_path.endswith("reasoning_train.jsonl") and "pipeline" not in rl
  assert sorted(w.weight for w in rl.rl.rewards.values()) == [1.0, 1.0, 1.0]
  every = pipeline.stage_config(c, "all_rl", seed_dir, 3)
  assert every.init_from.endswith("rejection_sft")
  assert every.task.train_path.endswith("all_train.jsonl")
  zero = pipeline.stage_config(c, "r1_zero", seed_dir, 3)
  assert zero.init_from == "/tmp/base" and not zero.task.chat_template
  assert zero.rl.rewards.accuracy.first_line and zero.rl.rewards.format.weight == 0
  # Every stage's config passes its runner's checks (prompts against budgets included).
  sets = pipeline.write_task_data(c, seed_dir, 3)
  setup = trainer.start_setup(rl, schema=pipeline.rl_config.default_config(),
                              free_form=("rl.rewards",))
  pipeline.check_stages(c, pipeline.STAGES, seed_dir, 3, setup)
  c.rl.max_new_tokens = 12
  with pytest.raises(ValueError, match="stage all_rl: .*set config.train.seq_len >= 47"):
    pipeline.check_stages(c, ["all_rl"], seed_dir, 3, setup)
  c.pipeline.sft_seq_len = 40  # named as the pipeline field, not the stage run's own
  with pytest.raises(ValueError, match=r"stage cold_start_sft: config.pipeline.sft_seq_len=40 "
                                       r"is shorter than the longest cold-start record"):
    pipeline.check_stages(c, ["cold_start_sft"], seed_dir, 3, setup)
  # A stage whose input chain is neither requested nor finished: the whole chain is named.
  with pytest.raises(ValueError, match=r"needs stage\(s\) cold_start_sft,reasoning_rl,"
                                       r"rejection_sft finished .* --config.pipeline.stages="
                                       r"cold_start_sft,reasoning_rl,rejection_sft,all_rl$"):
    pipeline.check_order(c, ["all_rl"], seed_dir)
  pipeline.check_order(c, ["cold_start_sft", "reasoning_rl"], seed_dir)
  with pytest.raises(ValueError, match=r"config.pipeline.ops: use some of"):
    with pipeline.pipeline_fields():
      pipeline.task_sets(_config(ops="+/"))
  assert len(sets["eval"]) == 8 + 20


@pytest.mark.parametrize("field, value, match", [
    ("stages", "cold_start_sft,grpo", "pipeline.stages"),
    ("seeds", "a,b", "pipeline.seeds"),
    ("rejection_require", "accuracy,style", "pipeline.rejection_require"),
    ("sft_steps", 0, "pipeline.sft_steps"),
])
def test_bad_pipeline_fields_are_named(field, value, match):
  with pytest.raises(ValueError, match=match):
    pipeline.validate_pipeline(_config(**{field: value}))
  c = _config()
  c.init_from = ""
  with pytest.raises(ValueError, match="config.init_from"):
    pipeline.validate_pipeline(c)


def test_held_out_prompts_are_in_no_training_set(tmp_path):
  c = _config(max_operand=9, cold_start_records=400, cold_start_max_operand=9)
  sets = pipeline.write_task_data(c, str(tmp_path), 0)
  held_out = {r["prompt"] for r in sets["eval"]}
  assert {r["kind"] for r in sets["eval"]} == {"add", "sub", "mul", "fact"}
  assert len(sets["eval"]) == 51 + 20  # 20% of 255 problems and of 100 questions
  for name in ("reasoning_train", "all_train", "cold_start"):
    with open(tmp_path / "data" / f"{name}.jsonl") as f:
      prompts = {json.loads(line)["prompt"] for line in f}
    assert prompts and not prompts & held_out, name
  facts = [r for r in sets["all_train"] if r["kind"] == "fact"]
  qa = pipeline.qa_records(facts, 10, seed=0)
  assert all(format_reward(r, r["response"]) == 1.0 == accuracy_reward(r, r["response"])
             for r in qa)
  assert not {r["prompt"] for r in qa} & held_out
  # Rewriting the same data is a no-op; other data is never written over a user's file.
  pipeline.write_task_data(c, str(tmp_path), 0)
  with pytest.raises(ValueError, match="cold_start.jsonl holds other records"):
    pipeline.write_task_data(c, str(tmp_path), 1)


def test_rejection_set_keeps_what_passes_and_stops_on_nothing():
  reward = combine({"accuracy": 1.0, "format": 1.0, "language": 1.0})
  records = [{"prompt": "2 + 2 =", "answer": 4, "kind": "add"}] * 3 + [
      {"prompt": "3 * 3 =", "answer": 9, "kind": "mul"}] * 3
  good = "<think>2 and 2 make 4.</think><answer>4</answer>"
  completions = [good, "<answer>4</answer>", "<think>x</think><answer>5</answer>",
                 "<think>3 threes.</think><answer>8</answer>", "9", "<think></think><answer>9"]
  others = [{"prompt": "Q", "response": "<think></think><answer>A</answer>", "kind": "qa"}]
  kept, stats = pipeline.rejection_set(records, completions, reward,
                                       ["accuracy", "format", "language"], per_prompt=2,
                                       others=others)
  assert kept == [{"prompt": "2 + 2 =", "response": good, "kind": "add"}] + others
  assert stats.rate("add") == pytest.approx(1 / 3) and stats.rate("mul") == 0
  with pytest.raises(ValueError, match=r"kept none of 6 completions \(acceptance per kind: "
                                       r"add 0\.0%, mul 0\.0%"):
    pipeline.rejection_set(records, completions[1:] + ["x"], reward,
                           ["accuracy", "format"], per_prompt=2, others=others)
  kept, _ = pipeline.rejection_set(records, completions, reward, [], per_prompt=1, others=[])
  assert len(kept) == 2  # nothing required: one distinct sample per prompt (the cap)
  # A completion with ids the tokenizer cannot write never passes, even with nothing required.
  kept, stats = pipeline.rejection_set(records, completions, reward, [], per_prompt=3,
                                       others=[], usable=[False, True] * 3)
  assert [r["response"] for r in kept] == [completions[1], completions[3], completions[5]]
  seen = []
  with pytest.raises(ValueError, match=r"passing each requirement: accuracy 33\.3%, format "
                                       r"0\.0%\); .*rejection_require; empty keeps"):
    pipeline.rejection_set(records, [c.replace("<think>", "") for c in completions], reward,
                           ["accuracy", "format"], per_prompt=2, others=others,
                           on_stats=seen.append)
  assert seen and seen[0].sampled == {"add": 3, "mul": 3}  # the table is saved before the stop


def test_table_has_one_row_per_stage_with_the_mean_over_seeds(tmp_path):
  rows = [dict(stage=s, seed=seed, step=1, accuracy_arithmetic=a, accuracy_fact=0.5,
               format_rate=1.0, response_length=10.0 + seed, kl_to_base=0.1, accuracy=a,
               prompts=3)
          for s, a in (("base", 0.0), ("all_rl", 0.5), ("r1_zero", 0.2)) for seed in (0, 1)]
  rows[3]["accuracy_arithmetic"] = 0.7
  text = pipeline.table_markdown(rows)
  lines = text.splitlines()
  assert len(lines) == 2 + 3 and lines[-1].startswith("| r1_zero (comparison) |")
  assert "| all_rl | 0.600 (0.500, 0.700) |" in text and "10.5 (10.0, 11.0)" in text
  pipeline.write_table(rows, str(tmp_path))
  with open(tmp_path / "r1_pipeline.csv") as f:
    assert len(f.readlines()) == 1 + 6


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny pretrained base (3 steps on the corpus)."""
  workdir = str(tmp_path_factory.mktemp("base"))
  c = train_config.default_config()
  c.model.preset = "tiny"
  c.model.overrides.vocab_size = 320
  c.model.overrides.init_std = 0.1
  c.data.corpus_documents = 200
  c.train.steps, c.train.batch_size, c.train.seq_len = 3, 8, 64
  c.checkpoint.async_save = False
  c.metrics.tensorboard = False
  c.sample.prompts = ()
  c.train.eval_batches = 1
  trainer.train(c, workdir)
  return workdir


def test_the_pipeline_runs_every_stage_resumes_and_stops_on_empty_rejection(base, tmp_path,
                                                                            capsys):
  workdir = str(tmp_path / "run")
  said = []
  # The tiny model writes no correct, well-formed answer: stage 3 stops with the rates.
  with pytest.raises(ValueError, match=r"stage rejection_sft: rejection sampling kept none of 68 "
                                       r"completions \(acceptance per kind: add 0\.0%, mul "
                                       r"0\.0%, sub 0\.0%"):
    pipeline.run(_config(base), workdir, report=said.append)
  seed_dir = os.path.join(workdir, "seed0")
  assert not os.path.exists(os.path.join(seed_dir, "data", "rejection_sft.jsonl"))
  with open(os.path.join(seed_dir, "data", "acceptance.md")) as f:
    assert "| add | " in f.read()
  assert not os.path.exists(os.path.join(seed_dir, "rejection_sft"))
  assert pipeline.finished_step(os.path.join(seed_dir, "reasoning_rl"), 2) == 2
  # Requiring nothing keeps every distinct sample; the finished stages are skipped.
  rows = pipeline.run(_config(base, rejection_require=""), workdir, report=said.append)["rows"]
  assert [r["stage"] for r in rows] == list(pipeline.ROWS)
  for r in rows:
    assert 0 <= r["accuracy_arithmetic"] <= 1 and 0 <= r["format_rate"] <= 1
    assert 1 <= r["response_length"] <= 8 and np.isfinite(r["kl_to_base"])
  assert abs(rows[0]["kl_to_base"]) < 1e-4  # the base against itself
  assert rows[1]["kl_to_base"] > 0.01  # SFT moved the policy
  with open(os.path.join(seed_dir, "data", "rejection_sft.jsonl")) as f:
    mixed = [json.loads(line) for line in f]
  assert sum(r["kind"] == "qa" for r in mixed) == 4 and len(mixed) > 4
  assert os.path.exists(os.path.join(workdir, "r1_pipeline.md"))
  assert said[-1] == pipeline.table_markdown(rows)
  mtimes = {s: os.path.getmtime(os.path.join(seed_dir, s, "metrics.jsonl"))
            for s in pipeline.STAGES}
  again = pipeline.run(_config(base, rejection_require=""), workdir, report=said.append)
  assert again == {"rows": rows}  # every stage skipped, every evaluation read back
  assert mtimes == {s: os.path.getmtime(os.path.join(seed_dir, s, "metrics.jsonl"))
                    for s in pipeline.STAGES}
  # A stage whose inputs changed since it was built is reported, not silently reused.
  marker = os.path.join(seed_dir, "rejection_sft", "pipeline_inputs.json")
  with open(marker) as f:
    assert json.load(f) == {"base": 3, "reasoning_rl": 2}
  with open(marker, "w") as f:
    json.dump({"base": 3, "reasoning_rl": 1}, f)
  capsys.readouterr()
  pipeline.run(_config(base, rejection_require="", stages="rejection_sft"), workdir)
  assert ("warning: stage rejection_sft was built from {'base': 3, 'reasoning_rl': 1} and its "
          "inputs are now at {'base': 3, 'reasoning_rl': 2}") in capsys.readouterr().out
  # A subset whose input stage is missing names the chain, before anything runs.
  with pytest.raises(ValueError, match="needs stage\\(s\\) cold_start_sft,reasoning_rl,"
                                       "rejection_sft finished"):
    pipeline.run(_config(base, stages="all_rl"), str(tmp_path / "other"))


def test_a_stage_stopped_by_sigterm_stops_the_pipeline_to_resume_later(base, tmp_path,
                                                                      monkeypatch):
  calls = []

  def preempted_run(config, workdir, step=None):
    calls.append(workdir)
    return {"step": 1, "preempted_at": 1}
  monkeypatch.setattr(pipeline.loop, "run", preempted_run)
  out = pipeline.run(_config(base, stages="r1_zero,cold_start_sft"), str(tmp_path))
  assert out == {"preempted": "r1_zero", "preempted_at": 1, "rows": []}
  assert len(calls) == 1  # cold_start_sft did not start
  assert not os.path.exists(os.path.join(tmp_path, "seed0", "r1_zero", "pipeline_inputs.json"))


def test_a_signal_after_the_loop_is_reported_not_lost():
  preemption = trainer.Preemption()
  try:
    assert preemption.late({"step": 7}) == {"step": 7}
    preemption.requested = "SIGTERM"  # arrived during the final evaluation
    assert preemption.late({"step": 7}) == {"step": 7, "preempted_at": 7}
    assert preemption.late({"step": 7, "preempted_at": 5})["preempted_at"] == 5
  finally:
    preemption.restore()
