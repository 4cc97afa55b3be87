"""experiments/train.py end to end, in subprocesses: preemption and exact resume, divergence,
observability files, evaluate / sample, and refusing to mix models in one workdir."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "experiments" / "configs" / "tiny.py"
COMMON = ["--config.train.steps=24", "--config.checkpoint.every=10", "--config.train.log_every=2"]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, not the 8 fake ones of in-process tests
  return env


def _cmd(script, workdir, *args):
  return [sys.executable, str(REPO / "experiments" / script), f"--config={TINY}",
          f"--workdir={workdir}", *args]


def _run(script, workdir, *args):
  return subprocess.run(_cmd(script, workdir, *args), env=_env(), capture_output=True, text=True,
                        timeout=600)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _state(workdir, step):
  """The saved arrays as NumPy-comparable host arrays (no target, so orbax reads the saved
  shardings and warns about it; expected here)."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Sharding info not provided")
    return ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                         "state"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  proc = _run("train.py", workdir, *COMMON)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc.stdout


def test_training_logs_loss_falling_and_writes_observability_files(reference_run):
  workdir, stdout = reference_run
  records = _records(workdir)
  assert [r["step"] for r in records] == list(range(2, 25, 2))
  assert records[-1]["ce"] < records[0]["ce"] - 1.0
  for key in ("loss", "ce", "mtp_ce", "expert_balance", "moe_load_max_over_mean",
              "moe_load_min_over_mean", "moe_load_entropy", "dropped_fraction", "grad_norm",
              "learning_rate", "tokens_per_s", "step_time", "mfu"):
    assert key in records[-1], key
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [10, 20, 24]
  assert "[####################] 24/24" in stdout and "--- sample ---" in stdout
  assert "held-out: loss" in stdout


def test_sigterm_saves_and_the_resumed_run_is_bitwise_identical(reference_run, tmp_path):
  ref_dir, _ = reference_run
  workdir = tmp_path / "preempted"
  proc = subprocess.Popen(_cmd("train.py", workdir, *COMMON), env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline:  # wait until training is under way, then preempt
    if (workdir / "metrics.jsonl").exists() and _records(workdir) and _records(workdir)[-1]["step"] >= 4:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 75, stderr[-3000:]  # PREEMPTED_EXIT_CODE: schedulers rerun it
  saved = int(stdout.split("SIGTERM: saved step ")[1].split()[0])
  assert 4 <= saved < 24 and (workdir / "checkpoints" / str(saved)).is_dir()

  resumed = _run("train.py", workdir, *COMMON)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {saved}" in resumed.stdout
  want, got = _state(ref_dir, 24), _state(workdir, 24)
  flat_want, flat_got = (dict(_flatten(x)) for x in (want, got))
  assert flat_want.keys() == flat_got.keys() and len(flat_want) > 100
  for key, value in flat_want.items():
    np.testing.assert_array_equal(flat_got[key], value, err_msg=key)  # bitwise
  curve = lambda d: [(r["step"], r["loss"], r["ce"]) for r in _records(d)]
  assert curve(workdir) == curve(ref_dir)


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f"{prefix}/{k}")
  else:
    yield prefix, np.asarray(tree)


def test_evaluate_and_sample_read_the_latest_checkpoint(reference_run):
  workdir, _ = reference_run
  ev = _run("evaluate.py", workdir, "--batches=2")
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert "step 24: held-out loss" in ev.stdout and "perplexity" in ev.stdout
  sample = _run("sample.py", workdir, "--prompt=Leo lives in", "--config.sample.max_new_tokens=8")
  assert sample.returncode == 0, sample.stderr[-3000:]
  assert "--- sample ---\nLeo lives in" in sample.stdout
  chat = _run("sample.py", workdir, "--prompt=1 + 1 =", "--config.sample.max_new_tokens=4",
              "--config.sample.chat_template=True")
  assert chat.returncode == 0, chat.stderr[-3000:]
  assert "(prompts in the chat template)" in chat.stdout
  assert "--- sample ---\n1 + 1 =" in chat.stdout


def test_evaluate_gives_the_loss_by_position_on_windows_past_the_training_length(reference_run,
                                                                                tmp_path):
  workdir, _ = reference_run
  out = tmp_path / "positions.json"
  # the tiny preset already uses YaRN (yarn_factor=4): rescaling it again is refused
  proc = _run("evaluate.py", workdir, "--lengths=2x")
  assert proc.returncode == 1 and proc.stderr.strip() == (
      "error: YaRN at evaluation rescales a model trained without YaRN, but this one has "
      "yarn_factor=4.0; evaluate it without (evaluate.py --noyarn)")
  proc = _run("evaluate.py", workdir, "--lengths=1x,2x", "--noyarn", "--windows=3",
              f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["step"] == 24 and result["train_len"] == 64
  assert sorted(result["curves"]) == ["L128", "L64"]
  curve = result["curves"]["L128"]
  assert curve["windows"] == 3 and curve["yarn_factor"] == 4.0 and len(curve["loss"]) == 128
  assert all(np.isfinite(curve["loss"])) and "L128: 3 windows; mean loss by position [0, 64)" \
      in proc.stdout
  assert curve["in_range_first_document"] > 0 and curve["in_range_later_documents"] > 0
  again = _run("evaluate.py", workdir, "--lengths=2x", "--noyarn", f"--output={out}")
  assert again.returncode == 1 and again.stderr.strip() == (
      f"error: {out} exists; give another --output or delete it")
  folder = tmp_path / "a_folder"
  folder.mkdir()
  for bad, message in [
      (["--lengths=two"], "error: --lengths: 'two' is neither a token count"),
      ([f"--output={out}"], "error: --output: only used with --lengths"),
      (["--lengths=2x", "--batches=2"], "error: --batches is for the mean held-out loss"),
      (["--lengths=2x", f"--output={folder}", "--overwrite"], f"error: --output={folder} is a "
       "folder")]:
    proc = _run("evaluate.py", workdir, *bad)
    assert proc.returncode == 1 and proc.stderr.strip().startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder", "positions.json"]


def test_a_different_model_is_refused_and_nothing_is_overwritten(reference_run):
  workdir, _ = reference_run
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  proc = _run("train.py", workdir, *COMMON, "--config.model.overrides.d_model=32",
              "--config.train.steps=30")
  assert proc.returncode == 1
  assert "error: the checkpoints in" in proc.stderr and "d_model: saved 64 vs now 32" in proc.stderr
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_a_diverged_run_keeps_a_step_that_trains_and_the_rerun_resumes_from_it(tmp_path):
  # lr 1e30: step 2's update gives finite but huge weights (the check before saving passes),
  # whose gradient at step 3 is NaN; step 2 must not be the step a rerun resumes from.
  proc = _run("train.py", tmp_path, "--config.train.steps=20", "--config.checkpoint.every=1",
              "--config.train.log_every=1", "--config.optimizer.learning_rate=1e30",
              "--config.optimizer.warmup_steps=1")
  assert proc.returncode == 1
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith("error: loss or gradient norm is not finite (") and "at step 3" in line
  assert "Step 2, whose parameters gave it, was moved to" in line
  assert "Last good checkpoint: step 1 in" in line
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
  assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints-set-aside").iterdir()] == ["2"]
  assert all(np.isfinite(v).all() for _, v in _flatten(_state(tmp_path, 1)))
  # The advice works: a sane learning rate resumes from step 1 and finishes.
  rerun = _run("train.py", tmp_path, "--config.train.steps=6", "--config.checkpoint.every=3",
               "--config.train.log_every=3")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from step 1" in rerun.stdout and "held-out: loss" in rerun.stdout


def _corrupt_latest(workdir, step):
  step_dir = workdir / "checkpoints" / str(step)
  files = [p for p in step_dir.rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0x10  # one bit
  biggest.write_bytes(bytes(data))
  return biggest.relative_to(step_dir)


def test_a_corrupted_step_is_detected_never_trained_on_and_never_deleted(reference_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  damaged = _corrupt_latest(workdir, 24)
  ev = _run("evaluate.py", workdir, "--batches=2")
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert f"checkpoint step 24 in {workdir}/checkpoints is not used: {damaged}: checksum " \
         "mismatch" in ev.stdout
  assert "using step 20, the newest checkpoint that verifies" in ev.stdout
  assert "step 20: held-out loss" in ev.stdout
  asked = _run("sample.py", workdir, "--step=24", "--config.sample.max_new_tokens=4")
  assert asked.returncode == 1 and asked.stderr.strip().splitlines()[-1].startswith(
      f"error: checkpoint step 24 in {workdir}/checkpoints fails verification: {damaged}")
  step0 = _run("evaluate.py", workdir, "--step=0", "--batches=1")
  assert step0.returncode == 1 and "no checkpoint at step 0" in step0.stderr
  # Training resumes from the newest good step, the bad one moved aside (kept).
  resumed = _run("train.py", workdir, *COMMON)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 20" in resumed.stdout
  assert "moved step(s) [24] (newer than step 20)" in resumed.stdout
  aside = list((tmp_path / "run" / "checkpoints-set-aside").iterdir())
  assert [p.name.split("-")[0] for p in aside] == ["24"] and aside[0].name.endswith("verification")
  flat = lambda d: dict(_flatten(_state(d, 24)))  # noqa: E731
  want, got = flat(reference_run[0]), flat(workdir)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)  # retrained: bitwise the same


def test_resume_explains_itself(reference_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  done = _run("train.py", workdir, *COMMON)
  assert done.returncode == 0 and "already at step 24 (config.train.steps=24); nothing to do" \
      in done.stdout
  other = _run("train.py", workdir, *COMMON, "--config.train.steps=30", "--config.train.seq_len=32")
  assert other.returncode == 1 and "config.train.seq_len: saved 64, now 32" in other.stderr
  assert f"--config.train.init_from={workdir}/checkpoints/24" in other.stderr
  # Fine-tuning from those weights in a new workdir: fresh optimizer, step counter and data.
  tuned = _run("train.py", tmp_path / "tuned", "--config.train.steps=4", "--config.train.seq_len=32",
               "--config.train.log_every=2", f"--config.train.init_from={workdir}/checkpoints/24")
  assert tuned.returncode == 0, tuned.stderr[-3000:]
  assert f"initialised from the weights of {workdir}/checkpoints/24" in tuned.stdout
  first = _records(tmp_path / "tuned")[0]
  assert first["step"] == 2 and first["ce"] < _records(reference_run[0])[0]["ce"] - 1.0
  # --step=N rolls back (newer steps moved aside, kept); --step=0 starts from the initialisation.
  back = _run("train.py", workdir, *COMMON, "--step=10", "--config.train.steps=12")
  assert back.returncode == 0, back.stderr[-3000:]
  assert "resumed from step 10" in back.stdout and "moved step(s) [20, 24] (newer than step 10)" \
      in back.stdout
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "12"]


def test_ctrl_c_saves_and_exits_75_and_a_second_run_on_a_live_workdir_is_refused(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(_cmd("train.py", workdir, "--config.train.steps=100000",
                               "--config.checkpoint.every=100000", "--config.train.log_every=2"),
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not (
      (workdir / "metrics.jsonl").exists() and _records(workdir)):
    time.sleep(0.2)
  second = _run("train.py", workdir, "--config.train.steps=100000")
  assert second.returncode == 1
  assert f"error: {workdir} is in use by pid {proc.pid} on host" in second.stderr
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 75, stderr[-3000:]
  assert "Traceback" not in stderr
  saved = int(stdout.split("SIGINT: saved step ")[1].split()[0])
  assert (workdir / "checkpoints" / str(saved) / "checksums.json").is_file()
  assert not (workdir / "LOCK").exists()


def test_step_zero_restarts_and_weights_only_checkpoints_are_read_not_resumed(reference_run,
                                                                             tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  params = tmp_path / "params"
  conv = subprocess.run([sys.executable, "-m", "deepseek_jax.convert", f"--from_orbax={workdir}",
                         f"--to_orbax={params}", "--step=20"], env=_env(), capture_output=True,
                        text=True, timeout=600, cwd=REPO)
  assert conv.returncode == 0, conv.stderr[-2000:]
  # evaluate reads the weights of a parameters checkpoint (it has a step 0)...
  ev = _run("evaluate.py", params, "--batches=1", "--step=0")
  assert ev.returncode == 0 and "step 0: held-out loss" in ev.stdout, ev.stderr[-2000:]
  # ...but training cannot resume one: it says how to fine-tune from it instead.
  proc = _run("train.py", params, "--config.train.steps=4")
  assert proc.returncode == 1 and "holds weights only" in proc.stderr
  assert f"--config.train.init_from={params}" in proc.stderr
  # --step=0 on a training workdir starts from the initialisation, every step moved aside.
  again = _run("train.py", workdir, *COMMON, "--step=0", "--config.train.steps=2",
               "--config.checkpoint.every=2")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "moved step(s) [10, 20, 24] (newer than step 0)" in again.stdout
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
  assert _records(workdir)[0]["step"] == 2


def test_a_full_disk_stops_the_run_with_one_line(tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here (test_reliability injects the error instead)")
  try:
    proc = _run("train.py", disk / "w", "--config.train.steps=30", "--config.checkpoint.every=10",
                "--config.train.log_every=10")
  finally:
    subprocess.run(["umount", str(disk)], capture_output=True)
  assert proc.returncode == 1
  assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.startswith(f"error: saving checkpoint step 20 to {disk}/w/checkpoints/20 "
                                "failed: no space left on device; the state needs about ")
  assert "The last complete checkpoint is step 10" in proc.stderr


def test_bad_workdirs_are_refused_and_evaluate_creates_nothing(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("")
  proc = _run("train.py", a_file, "--config.train.steps=2")
  assert proc.returncode == 1 and proc.stderr.strip() == (
      f"error: --workdir={a_file} is a file, not a folder; give a folder path")
  missing = tmp_path / "missing"
  proc = _run("evaluate.py", missing)
  assert proc.returncode == 1 and "does not exist" in proc.stderr and not missing.exists()
  proc = _run("train.py", missing, f"--config.train.init_from={tmp_path / 'nowhere'}")
  assert proc.returncode == 1 and "config.train.init_from=" in proc.stderr
  assert not missing.exists()


def test_cpu_xla_flags_are_appended_but_a_users_setting_wins(monkeypatch):
  from deepseek_jax.cli import CPU_XLA_FLAGS, set_cpu_xla_flags
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  set_cpu_xla_flags()
  assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                             *CPU_XLA_FLAGS]
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  set_cpu_xla_flags()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"


def test_a_training_workdir_converts_to_hf_and_back_to_the_same_weights(reference_run, tmp_path):
  from flax import nnx

  from deepseek_jax.interop.hf_checkpoint import load_hf_checkpoint
  from deepseek_jax.interop.orbax_params import load_model

  workdir, _ = reference_run
  proc = subprocess.run([sys.executable, "-m", "deepseek_jax.convert", f"--from_orbax={workdir}",
                         f"--to_hf={tmp_path / 'hf'}", "--step=20"], env=_env(),
                        capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  trained = load_model(str(workdir), step=20)
  saved = _state(workdir, 20)["params"]["embed"]["embedding"]  # the trainer's own record
  saved = saved["value"] if isinstance(saved, dict) else saved
  np.testing.assert_array_equal(np.asarray(trained.embed.embedding[...]), np.asarray(saved))
  exported = dict(nnx.to_flat_state(nnx.state(load_hf_checkpoint(str(tmp_path / "hf")))))
  for path, variable in nnx.to_flat_state(nnx.state(trained)):
    np.testing.assert_array_equal(np.asarray(exported[path][...]), np.asarray(variable[...]))
