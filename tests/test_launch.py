"""The Cloud TPU launch script (experiments/launch/tpu_pod.sh, dry run: the gcloud commands it
would run) and the ahead-of-time train-step compile (experiments/aot_train_tpu.py) on a small
TPU topology description."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "launch", "tpu_pod.sh")


def dry_run(*args, **env):
  """The commands ``tpu_pod.sh args`` prints in a dry run, each split into its words."""
  environ = {k: v for k, v in os.environ.items()
             if k not in ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION",
                          "BUCKET", "RUN_NAME", "CONFIG", "TRAIN_FLAGS", "WORKDIR_MODE")}
  environ.update(env, DRY_RUN="1")
  out = subprocess.run(["bash", SCRIPT, *args], env=environ, capture_output=True, text=True,
                       check=True).stdout
  return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def option(words, name):
  values = [w.split("=", 1)[1] for w in words if w.startswith(f"--{name}=")]
  assert len(values) == 1, (name, words)
  return values[0]


def test_train_runs_the_trainer_on_every_worker_with_the_bucket_as_workdir():
  [ssh] = dry_run("train", BUCKET="gs://my-bucket", RUN_NAME="v3-run", TPU_NAME="pod",
                  ZONE="us-east5-a", TRAIN_FLAGS="--config.train.steps=10",
                  WORKDIR_MODE="gcsfuse")
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert option(ssh, "worker") == "all" and option(ssh, "zone") == "us-east5-a"
  remote = option(ssh, "command")
  # gcsfuse mode: the bucket mounted at the same path on every worker.
  assert "gcsfuse --implicit-dirs" in remote and "my-bucket /gcs/my-bucket" in remote
  train = remote[remote.index("experiments/train.py"):].split(">")[0].split()
  assert train == ["experiments/train.py", "--config=experiments/configs/small.py",
                   "--workdir=/gcs/my-bucket/v3-run", "--config.distributed.initialize=always",
                   "--config.train.steps=10"]


def test_a_bucket_folder_is_kept_and_a_running_trainer_is_not_started_twice():
  [ssh] = dry_run("train", BUCKET="gs://b/runs/", RUN_NAME="r")
  remote = option(ssh, "command")
  assert "--workdir=gs://b/runs/r " in remote
  assert remote.index("kill -0") < remote.index("nohup")  # the pid file is checked first


def test_gs_mode_passes_the_gs_path_as_workdir():
  for flags in (("--workdir_mode=gs",), ()):  # gs is the default
    [ssh] = dry_run(*flags, "--bucket=gs://my-bucket", "train", RUN_NAME="r")
    remote = option(ssh, "command")
    assert "--workdir=gs://my-bucket/r " in remote and "gcsfuse" not in remote
  [install] = dry_run("install", BUCKET="gs://b")
  assert "gcsfs google-cloud-storage" in option(install, "command")


def test_create_copy_install_and_delete_commands():
  env = dict(BUCKET="gs://b", TPU_NAME="pod", ACCELERATOR_TYPE="v5p-128", PROJECT="proj")
  [create] = dry_run("create", SPOT="1", **env)
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"]
  assert option(create, "accelerator-type") == "v5p-128"
  assert option(create, "version") == "v2-alpha-tpuv5" and "--spot" in create
  assert option(create, "project") == "proj"
  scp, untar = dry_run("copy", **env)[-2:]
  assert scp[4] == "scp" and option(scp, "worker") == "all" and scp[6] == "pod:~/"
  assert option(untar, "worker") == "all" and "tar xzf" in option(untar, "command")
  [install] = dry_run("install", **env)
  assert option(install, "worker") == "all" and "-e '.[tpu]'" in option(install, "command")
  [delete] = dry_run("delete", **env)
  assert delete[4:6] == ["delete", "pod"] and "--quiet" in delete


def test_resume_recreates_a_preempted_slice_then_reruns_the_same_train_command():
  commands = dry_run("resume", BUCKET="gs://b", DRY_RUN_STATE="PREEMPTED")
  verbs = [c[4] if c[0] == "gcloud" else c[0] for c in commands]
  assert verbs == ["describe", "delete", "create", "(cd", "scp", "ssh", "ssh", "ssh"]
  assert commands[-1] == dry_run("train", BUCKET="gs://b")[0]
  ready = dry_run("resume", BUCKET="gs://b")  # a live slice: stop the old run, then train
  assert [c[4] for c in ready] == ["describe", "ssh", "ssh"]
  assert "kill -TERM" in option(ready[1], "command")


def test_bad_settings_fail_before_any_command():
  for args, env in [(("train",), {}), (("--colour=red", "train"), {}),
                    (("train",), {"BUCKET": "gs://b", "WORKDIR_MODE": "nfs"}),
                    (("train",), {"BUCKET": "my-bucket"}),  # not gs://
                    # resume without a bucket: refused before the slice is deleted or created
                    (("resume",), {"DRY_RUN_STATE": "PREEMPTED"})]:
    result = subprocess.run(["bash", SCRIPT, *args], env={**os.environ, **env, "DRY_RUN": "1"},
                            capture_output=True, text=True)
    assert result.returncode == 2 and "gcloud" not in result.stdout, (args, result.stdout)


def test_aot_train_step_compiles_a_tiny_preset_for_a_v5p_slice(tmp_path):
  if not importlib.util.find_spec("libtpu"):
    pytest.skip("the TPU compiler needs libtpu (pip install 'jax[tpu]')")
  out = tmp_path / "aot.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "aot_train_tpu.py"), "--preset=tiny",
       "--topology=v5p:2x2x2", "--mesh=fsdp=-1,expert=4", "--batch=8", "--seq_len=64",
       "--grad_accum=2", "--remat=full", f"--json_out={out}"],
      env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(out.read_text())
  assert record["devices"] == 8 and record["device_kind"] == "TPU v5"
  assert record["mesh"] == {"stage": 1, "data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
  assert record["remat"] == "full" and record["grad_accum"] == 2
  assert "MoE expert_parallel" in record["execution"] and "megablox" in record["execution"]
  memory = record["memory_bytes"]
  assert 0 < memory["total"] < memory["hbm"] == 95 * 2 ** 30 and memory["fits"]
  assert "95 GiB per device (HBM_GIB table)" in result.stdout
