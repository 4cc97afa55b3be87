"""experiments/configs/small.py:ep4 through the normal entry point: the small model trains with
its routed experts split 4 ways over the mesh's expert axis (8 CPU devices split from the host)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from deepseek_jax.cli import set_cpu_devices

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_small_ep4_config_trains_expert_parallel_through_the_entry_point(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the config itself asks for 8 CPU devices
  cmd = [sys.executable, str(REPO / "experiments" / "train.py"),
         f"--config={REPO / 'experiments' / 'configs' / 'small.py'}:ep4,runlocal",
         f"--workdir={tmp_path}", "--config.train.steps=4", "--config.train.seq_len=32",
         "--config.train.log_every=2", "--config.checkpoint.every=4",
         "--config.train.eval_batches=1", "--config.sample.max_new_tokens=4"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ("mesh {'stage': 1, 'data': 1, 'fsdp': 2, 'expert': 4, 'tensor': 1} over 8 cpu "
          "device(s)") in proc.stdout
  assert "EP rows/tok" in proc.stdout and "OVERFLOW" not in proc.stdout
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  for r in records:  # 8 experts per shard = one routing group; 2 of 4 groups kept
    assert 1.0 <= r["dispatch_per_token"] <= 2.0 and r["overflow"] == 0
  assert records[-1]["loss"] < records[0]["loss"]
  assert (tmp_path / "checkpoints" / "4").is_dir()


def test_cpu_devices_are_requested_once_and_conflicts_are_refused(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  set_cpu_devices(8)
  assert os.environ["XLA_FLAGS"].split()[-1] == "--xla_force_host_platform_device_count=8"
  set_cpu_devices(8)  # already there: unchanged
  assert os.environ["XLA_FLAGS"].count("device_count") == 1
  with pytest.raises(ValueError, match="config.cpu_devices=4 conflicts with"):
    set_cpu_devices(4)
