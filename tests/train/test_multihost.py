"""Two local CPU processes (gloo) give the same losses as one process on the same global batch,
and experiments/train.py runs as a 2-process job."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices=None):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _launch(cmds, env):
  procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for c in cmds]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [o for o, _ in outs]


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
  single = tmp_path / "single.json"
  _launch([[sys.executable, str(HERE / "multihost_worker.py"), str(single)]], _env(devices=4))
  multi = tmp_path / "multi.json"
  port = str(_free_port())
  _launch([[sys.executable, str(HERE / "multihost_worker.py"), str(multi), port, "2", str(i)]
           for i in range(2)], _env())
  one, two = json.loads(single.read_text()), json.loads(multi.read_text())
  assert (one["devices"], one["processes"]) == (4, 1) and (two["devices"], two["processes"]) == (4, 2)
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
  assert one["losses"][-1] < one["losses"][0]


def test_train_py_runs_as_a_two_process_job(tmp_path):
  port = _free_port()
  cmd = lambda i: [sys.executable, str(REPO / "experiments" / "train.py"),
                   f"--config={REPO / 'experiments' / 'configs' / 'tiny.py'}",
                   f"--workdir={tmp_path}", "--config.train.steps=6", "--config.checkpoint.every=3",
                   f"--config.distributed.coordinator=localhost:{port}",
                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
  outs = _launch([cmd(0), cmd(1)], _env())
  assert "2 process(es)" in outs[0] and "[####################] 6/6" in outs[0]
  assert "6/6" not in outs[1]  # only process 0 logs
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6]
  assert sorted(p.name for p in (tmp_path / "checkpoints" / "6" / "data").glob("*.json")) == \
      ["process_0-of-2.json", "process_1-of-2.json"]  # each process's data position
