"""Workdirs on object stores (``gs://``): our own files (metrics.jsonl, the lock, checkpoint and
inference paths) go through ``etils.epath`` and the path is never made "absolute" into a local
``<cwd>/gs:/...`` folder. No bucket is reachable here, so epath's ``gs`` backend is redirected to
a local folder (every call with a ``gs://`` path lands under it). Orbax itself reaches GCS
through google-cloud-storage and tensorstore's GCS driver, which cannot be redirected here, so
the checkpoint writes are not exercised; ``Checkpointer`` passes them the path whole
(``resolve_path``)."""

import json
import os

import pytest
from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath

from deepseek_jax.cli import is_remote, resolve_path


class _Redirect:
  """epath backend: ``gs://x`` -> ``<root>/x`` on the local disk, every other path unchanged."""

  def __init__(self, root: str):
    self.root = root

  def _map(self, value):
    if isinstance(value, (str, os.PathLike)) and str(value).startswith("gs://"):
      return os.path.join(self.root, str(value)[len("gs://"):])
    return value

  def __getattr__(self, name):
    fn = getattr(backend_lib.os_backend, name)
    return lambda path, *a, **k: fn(self._map(path), *(self._map(x) for x in a), **k)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  root = tmp_path / "gcs"
  root.mkdir()
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", _Redirect(str(root)))
  monkeypatch.chdir(tmp_path)
  yield root
  assert not (tmp_path / "gs:").exists(), "a gs:// path was turned into a local folder"


def test_remote_paths_are_kept_whole():
  assert resolve_path("gs://b/run") == "gs://b/run" and is_remote("gs://b/run")
  assert resolve_path("run") == os.path.abspath("run") and not is_remote("/tmp/run")


def _metrics(loss: float) -> dict:
  return {"loss": loss, "ce": loss, "grad_norm": 1.0, "learning_rate": 1e-3}


def test_metrics_log_writes_and_truncates_on_the_bucket(bucket):
  from deepseek_jax.train.metrics import MetricsLogger
  kw = dict(total_steps=10, tokens_per_step=8, flops_per_token=1.0, n_devices=1,
            peak_flops=1.0, tensorboard=False)
  logger = MetricsLogger("gs://b/run", **kw)
  for step in (1, 2, 3):
    logger.log(step, _metrics(float(step)))
  logger.close()
  path = bucket / "b" / "run" / "metrics.jsonl"
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
  resumed = MetricsLogger("gs://b/run", resume_step=2, **kw)  # a resume drops steps after 2
  resumed.log(3, _metrics(30.0))
  resumed.close()
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] == 30.0


def test_lock_and_checks_leave_remote_workdirs_alone(bucket):
  from deepseek_jax.train.workdir import WorkdirLock, check_workdir
  check_workdir("gs://b/run")
  with WorkdirLock("gs://b/run") as lock:
    assert lock.path == "gs://b/run/LOCK"


def test_checkpointer_and_inference_paths_stay_remote(bucket):
  from deepseek_jax.interop.orbax_params import checkpoint_root
  from deepseek_jax.train.trainer import _inference_weights
  (bucket / "b" / "run" / "checkpoints").mkdir(parents=True)
  assert checkpoint_root("gs://b/run") == "gs://b/run/checkpoints"
  assert epath.Path("gs://b/run/checkpoints").is_dir()
  with pytest.raises(FileNotFoundError, match="no checkpoint in gs://b/run/checkpoints"):
    _inference_weights(None, "gs://b/run", None)
  with pytest.raises(FileNotFoundError, match="no checkpoints in gs://b/other"):
    _inference_weights(None, "gs://b/other", None)



def test_evaluation_output_files_on_the_bucket(bucket):
  from deepseek_jax.train.trainer import _check_output_file, _write_json
  _check_output_file("gs://b/eval/positions.json", overwrite=False)
  _write_json("gs://b/eval/positions.json", {"loss": 1.5})
  assert json.loads((bucket / "b" / "eval" / "positions.json").read_text()) == {"loss": 1.5}
  with pytest.raises(FileExistsError, match="gs://b/eval/positions.json exists"):
    _check_output_file("gs://b/eval/positions.json", overwrite=False)
  _check_output_file("gs://b/eval/positions.json", overwrite=True)
  with pytest.raises(IsADirectoryError, match="is a folder"):
    _check_output_file("gs://b/eval", overwrite=True)
