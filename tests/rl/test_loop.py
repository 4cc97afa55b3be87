"""The RL run in process (tiny model, 8 fake CPU devices, so rollout and steps run sharded over
the mesh): metrics, exact resume, the reference and value models in the checkpoint, DAPO
dynamic sampling, and bad input refused before compiling."""

import json
import os

import jax
import numpy as np
import pytest

from deepseek_jax.rl import loop
from deepseek_jax.rl.config import default_config
from deepseek_jax.rl.rewards import REWARDS, RewardError
from deepseek_jax.train.trainer import TrainingDiverged


def _config(**rl):
  c = default_config()
  c.model.preset = "tiny"
  c.model.overrides.vocab_size = 320
  c.model.overrides.init_std = 0.1
  c.data.corpus_documents = 200
  c.train.steps = 4
  c.train.seq_len = 16
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.metrics.tensorboard = False
  c.optimizer.learning_rate = 1e-3
  c.task.max_operand = 4
  c.rl.prompts_per_step = 4
  c.rl.group_size = 4
  c.rl.max_new_tokens = 4
  c.rl.eval_every = 2
  c.rl.eval_prompts = 8
  c.rl.update(rl)
  return c


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _saved(workdir, step):
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("grpo"))
  result = loop.run(_config(beta=0.04, ref_refresh_every=3), workdir)
  return workdir, result


def test_a_grpo_run_logs_every_metric_the_issue_names_and_saves_the_reference(grpo_run):
  workdir, result = grpo_run
  start, *records = _records(workdir)
  assert start["step"] == 0 and start["eval_accuracy"] == result["eval_accuracy_start"]
  assert 0 <= start["train_accuracy"] <= 1 and "train_accuracy" in records[3]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for key in ("reward", "reward_accuracy", "accuracy", "kl", "clip_fraction", "entropy",
              "response_length", "rollout_s", "update_s", "rollout_tokens_per_s",
              "update_tokens_per_s", "grad_norm", "loss"):
    assert all(np.isfinite(r[key]) for r in records), key
  assert "eval_accuracy" in records[1] and "eval_accuracy" in records[3]
  assert 0 <= result["eval_accuracy"] <= 1 and 0 <= result["eval_accuracy_start"] <= 1
  assert all(1 <= r["response_length"] <= 4 for r in records)
  state = _saved(workdir, 4)
  assert set(state) >= {"policy", "ref"}
  # The reference was refreshed at step 3: it equals the policy after step 3, not step 4's.
  ref3 = jax.tree.leaves(state["ref"])
  assert not all(np.array_equal(a, b) for a, b in zip(
      ref3, jax.tree.leaves(state["policy"]["params"])))
  # The policy is what load_model (evaluate, sample, convert, a later init_from) reads.
  from flax import nnx
  from deepseek_jax.interop.orbax_params import load_model
  loaded = nnx.state(load_model(workdir), nnx.Param)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state["policy"]["params"])):
    np.testing.assert_array_equal(a, b)


def test_a_killed_run_resumes_to_the_uninterrupted_run_bitwise(grpo_run, tmp_path):
  workdir, _ = grpo_run
  config = _config(beta=0.04, ref_refresh_every=3)
  with config.unlocked():
    config.train.steps = 2
  loop.run(config, str(tmp_path))
  with config.unlocked():
    config.train.steps = 4
  loop.run(config, str(tmp_path))  # resumes step 2: policy, Adam, reference, prompt order
  a, b = _saved(workdir, 4), _saved(str(tmp_path), 4)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert [r.get("reward") for r in _records(workdir)] == [r.get("reward") for r in _records(tmp_path)]


def test_ppo_from_an_hf_checkpoint_keeps_and_saves_a_value_model_trained_by_the_step(
    tmp_path, capsys):
  from deepseek_jax.config import ModelConfig
  from deepseek_jax.interop.hf_checkpoint import save_hf_checkpoint
  from deepseek_jax.model.transformer import create_model
  hf = str(tmp_path / "hf")
  save_hf_checkpoint(create_model(ModelConfig.preset("tiny", vocab_size=320, init_std=0.1), 3),
                     hf)
  config = _config(algorithm="ppo", kl_coef=0.05)
  with config.unlocked():
    config.init_from = hf
  result = loop.run(config, str(tmp_path / "run"))
  assert f"policy initialised from the weights of {hf}" in capsys.readouterr().out
  with config.unlocked():  # killed after step 2, then resumed: policy, value, both Adams
    config.train.steps = 2
  loop.run(config, str(tmp_path / "resumed"))
  with config.unlocked():
    config.train.steps = 4
  loop.run(config, str(tmp_path / "resumed"))
  for x, y in zip(jax.tree.leaves(_saved(str(tmp_path / "run"), 4)),
                  jax.tree.leaves(_saved(str(tmp_path / "resumed"), 4))):
    np.testing.assert_array_equal(x, y)
  tmp_path = tmp_path / "run"
  records = _records(tmp_path)[1:]
  assert all(np.isfinite(r["value_loss"]) and np.isfinite(r["value_grad_norm"])
             and np.isfinite(r["kl"]) for r in records)  # kl: the penalty's k1 estimate
  state = _saved(str(tmp_path), 4)
  assert {"policy", "ref", "value"} <= set(state)
  assert np.any(state["value"]["params"]["value_head"] != 0)  # the head trained from zero
  assert result["eval_accuracy"] is not None


def test_dynamic_sampling_fills_the_batch_with_informative_groups(tmp_path):
  loop.run(_config(dynamic_sampling_rounds=3, beta=0.0, loss_aggregation="token_mean",
                   epsilon_high=0.28), str(tmp_path))
  for r in _records(tmp_path)[1:]:
    assert 1 <= r["sampling_rounds"] <= 4 and 0 <= r["kept_groups"] <= 1
    assert r["kept_groups"] == 1 or r["sampling_rounds"] == 4  # full, or out of rounds
    assert "kl" not in r  # beta = 0: no reference model, no KL to report


@pytest.mark.parametrize("field, value, message", [
    ("group_size", 1, "config.rl.group_size: GRPO needs G >= 2"),
    ("max_new_tokens", 14, "only 3 fit .* set config.train.seq_len >= 21"),
    ("stop", ("ab",), "config.rl.stop: 'ab' is 2 tokens"),
    ("algorithm", "dpo", "config.rl.algorithm"),
])
def test_bad_rl_settings_are_refused_before_compiling(tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    loop.run(_config(**{field: value}), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_a_reward_that_raises_names_the_record_and_stops_the_run(tmp_path):
  config = _config()
  with config.unlocked():
    config.rl.rewards = {"accuracy": {"weight": 1.0, "answer_key": "solution"}}
  with pytest.raises(RewardError, match=r"reward 'accuracy' failed on training record 0 .*'prompt'"):
    loop.run(config, str(tmp_path))


def _odd_length(record, completion):
  """A reward a random policy earns half the time (so advantages, and gradients, are not 0)."""
  del record
  return float(len(completion) % 2)


def test_a_nan_loss_stops_with_the_step_named_and_the_last_good_checkpoint_kept(tmp_path,
                                                                               monkeypatch):
  monkeypatch.setitem(REWARDS, "odd_length", _odd_length)
  config = _config(beta=0.0)
  with config.unlocked():
    config.rl.rewards = {"odd_length": 1.0}
    config.optimizer.learning_rate = 1e30
    config.checkpoint.every = 1
  with pytest.raises(TrainingDiverged, match=r"not finite.* at step \d+; stopped without") as error:
    loop.run(config, str(tmp_path))
  step = int(str(error.value).split(" at step ")[1].split(";")[0])
  assert step >= 2  # step 1's Adam update is +-lr: huge but finite; step 2's loss is not
  sealed = [int(d) for d in os.listdir(tmp_path / "checkpoints")
            if os.path.exists(tmp_path / "checkpoints" / d / "checksums.json")]
  assert all(s < step - 1 for s in sealed)  # no step whose parameters diverged is kept


def test_the_entry_point_reports_bad_input_in_one_line_before_compiling(tmp_path):
  import pathlib
  import subprocess
  import sys
  repo = pathlib.Path(__file__).resolve().parents[2]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

  def run(*args):
    return subprocess.run([sys.executable, str(repo / "experiments" / "rl.py"),
                           f"--config={repo / 'experiments' / 'configs' / 'r1_zero.py'}",
                           f"--workdir={tmp_path / 'w'}", *args], env=env, capture_output=True,
                          text=True, timeout=300)
  proc = run(f"--config.init_from={tmp_path / 'missing'}")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"error: config.init_from={tmp_path / 'missing'} does not exist")
  proc = run("--config.init_from=", "--config.rl.group_size=1")
  assert proc.returncode == 1
  assert "error: config.rl.group_size: GRPO needs G >= 2" in proc.stderr.splitlines()[-1]
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_the_lr_schedule_counts_optimizer_steps_mu_per_rl_step():
  from deepseek_jax.rl.config import optimizer_config
  config = _config(iterations=3)
  assert optimizer_config(config).total_steps == 4 * 3
  assert optimizer_config(config, learning_rate=5e-6).learning_rate == 5e-6
  with config.unlocked():
    config.optimizer.total_steps = 20  # a value the user set is kept
  assert optimizer_config(config).total_steps == 20


def test_dynamic_sampling_is_refused_for_ppo(tmp_path):
  with pytest.raises(ValueError, match="config.rl.dynamic_sampling_rounds: .* use 0 with PPO"):
    loop.run(_config(algorithm="ppo", dynamic_sampling_rounds=2), str(tmp_path))


def test_record_memory_writes_the_compiled_update_memory_at_the_first_step(tmp_path):
  memory = {}
  for algorithm in ("grpo", "ppo"):
    config = _config(algorithm=algorithm, record_memory=True, beta=0.04)
    with config.unlocked():
      config.train.steps = 2
      config.train.log_every = 2  # the first step's record is written for its memory anyway
    loop.run(config, str(tmp_path / algorithm))
    records = [r for r in _records(str(tmp_path / algorithm)) if r["step"] > 0]
    assert "memory_update_peak_bytes" in records[0] and records[0]["step"] == 1
    assert all("memory_update_peak_bytes" not in r for r in records[1:])  # once per run
    memory[algorithm] = {k: v for k, v in records[0].items() if k.startswith("memory_")}
  grpo, ppo = memory["grpo"], memory["ppo"]
  assert grpo["memory_reference_bytes"] > 0 and "memory_value_state_bytes" not in grpo
  assert ppo["memory_value_state_bytes"] > 0 and ppo["memory_value_step_temp_bytes"] > 0
  assert grpo["memory_policy_state_bytes"] == ppo["memory_policy_state_bytes"]  # same policy
  # PPO holds the value model and its Adam moments on top of what GRPO holds
  assert ppo["memory_update_peak_bytes"] > grpo["memory_update_peak_bytes"]
