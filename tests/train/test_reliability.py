"""Reliability, in process: checkpoint checksums and what a damaged step does, keep-N rotation,
failed saves, the workdir checks and lock, and convert never leaving a half-written target.
(The same behaviours end to end, through the command line: test_trainer_cli.py.)"""

import contextlib
import errno
import json
import os
import socket
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.cli import error_line
from deepseek_jax.interop import integrity
from deepseek_jax.train import data as D
from deepseek_jax.train import workdir as W
from deepseek_jax.train.checkpoint import Checkpointer, SaveFailed, check_data_position
from deepseek_jax.train.config import default_config


def _iterator():
  cfg = default_config()
  cfg.data.corpus_documents = 100
  it = iter(D.make_dataset(cfg.data, D.ByteTokenizer(), seq_len=32, batch_size=2))
  next(it)
  return it


def _tree(value: float, n: int = 64 * 1024):
  """Random (incompressible) weights: n float32s, about 4n bytes on disk."""
  w = jax.random.normal(jax.random.key(int(value)), (n,), jnp.float32)
  return {"w": w, "step": jnp.int32(int(value))}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _saved(directory, steps, *, keep=10, confirm=True):
  """A Checkpointer that saved (and, with ``confirm``, sealed) ``steps``; closed."""
  ckpt = Checkpointer(str(directory), every=1, keep=keep)
  it = _iterator()
  for step in steps:
    assert ckpt.save(step, _tree(step), it, {"model_config": {}}, force=True)
    if confirm:
      ckpt.confirm(step)
  ckpt.close()
  return ckpt


def _largest_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
           if f != integrity.MANIFEST]
  return max(files, key=os.path.getsize)


def _flip_bit(path, offset=None):
  with open(path, "r+b") as f:
    size = os.path.getsize(path)
    offset = size // 2 if offset is None else offset
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ 0x01]))


def _overwrite_64(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 3)
    f.write(b"\xff" * 64)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    "one flipped bit": lambda d: _flip_bit(_largest_file(d)),
    "64 overwritten bytes": lambda d: _overwrite_64(_largest_file(d)),
    "a truncated file": lambda d: _truncate(_largest_file(d)),
    "a missing file": lambda d: os.remove(_largest_file(d)),
    "garbage metadata": lambda d: open(os.path.join(d, "_CHECKPOINT_METADATA"), "w").write("{{"),
    "an empty metadata file": lambda d: open(os.path.join(d, "_CHECKPOINT_METADATA"), "w").close(),
    "a garbage checksums.json": lambda d: open(os.path.join(d, integrity.MANIFEST), "w").write("x"),
}
REASON = {
    "one flipped bit": "checksum mismatch", "64 overwritten bytes": "checksum mismatch",
    "a truncated file": "truncated to", "a missing file": "missing",
    "garbage metadata": "_CHECKPOINT_METADATA: ", "an empty metadata file": "truncated to 0",
    "a garbage checksums.json": "checksums.json is unreadable",
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_step_is_named_and_the_newest_good_step_is_used(tmp_path, damage):
  _saved(tmp_path, [1, 2, 3])
  step3 = os.path.join(tmp_path, "3")
  before = sorted(os.listdir(tmp_path))
  DAMAGE[damage](step3)
  said = []
  choice = integrity.choose_step(str(tmp_path), report=said.append)
  assert choice.step == 2 and list(choice.skipped) == [3]
  assert said[0].startswith(f"warning: checkpoint step 3 in {tmp_path} is not used: ")
  assert REASON[damage] in said[0] and "(not deleted)" in said[0]
  assert said[1] == "using step 2, the newest checkpoint that verifies"
  with pytest.raises(integrity.CheckpointIntegrityError,
                     match=f"step 3 in {tmp_path} fails verification: .*{REASON[damage]}"):
    integrity.choose_step(str(tmp_path), 3)
  assert sorted(os.listdir(tmp_path)) == before  # nothing deleted
  # The good step restores exactly.
  restored = Checkpointer(str(tmp_path), every=1, keep=10).restore(2, _abstract(_tree(2)))
  np.testing.assert_array_equal(restored["w"], _tree(2)["w"])


def test_empty_unsealed_and_requested_steps(tmp_path):
  _saved(tmp_path, [1, 2])
  _saved(tmp_path, [3], confirm=False)  # written, never confirmed: no checksums
  os.makedirs(tmp_path / "4")  # an empty step directory
  said = []
  assert integrity.choose_step(str(tmp_path), report=said.append).step == 2
  assert "step 4" in said[0] and "empty step directory" in said[0]
  assert "step 3" in said[1] and "unverified: no checksums.json" in said[1]
  # Asked for by number, an unverified step is read (with a warning); a missing one is named.
  said.clear()
  assert integrity.choose_step(str(tmp_path), 3, report=said.append).step == 3
  assert "restoring it unverified" in said[0]
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 0 .*saved steps: \[1, 2, 3, 4\]"):
    integrity.choose_step(str(tmp_path), 0)
  with pytest.raises(integrity.CheckpointIntegrityError, match="empty step directory"):
    integrity.choose_step(str(tmp_path), 4)
  # Every step bad: refused, naming the way out.
  for step in (1, 2):
    _flip_bit(_largest_file(tmp_path / str(step)))
  with pytest.raises(integrity.CheckpointIntegrityError, match="no checkpoint in .* verifies"):
    integrity.choose_step(str(tmp_path), report=lambda _: None)


def test_sealed_steps_stay_valid_as_later_steps_are_saved(tmp_path):
  _saved(tmp_path, [1, 2, 3, 4])
  for step in (1, 2, 3, 4):
    assert integrity.verify_step(tmp_path / str(step)) is None, step


def test_rotation_never_deletes_the_newest_sealed_step(tmp_path):
  ckpt = Checkpointer(str(tmp_path), every=1, keep=2)
  it = _iterator()
  for step in (1, 2, 3):
    ckpt.save(step, _tree(step), it, {}, force=True)
    ckpt.confirm(step)
  ckpt.wait()
  assert sorted(integrity.step_directories(tmp_path)) == [2, 3]  # keep=2
  for step in (4, 5, 6):  # saved but never confirmed (e.g. the run stopped): unverified
    ckpt.save(step, _tree(step), it, {}, force=True)
  ckpt.close()
  steps = integrity.step_directories(tmp_path)
  assert sorted(steps) == [3, 4, 5, 6]  # 3, the newest sealed step, survives keep=2
  assert integrity.verify_step(steps[3]) is None
  assert integrity.choose_step(str(tmp_path), report=lambda _: None).step == 3


def test_save_never_overwrites_and_set_aside_keeps_the_files(tmp_path):
  _saved(tmp_path / "checkpoints", [1, 2])
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), every=1, keep=10)
  assert not ckpt.save(2, _tree(9), _iterator(), {}, force=True)
  aside = ckpt.set_aside([2], "superseded")
  ckpt.close()
  moved = os.listdir(aside)
  assert len(moved) == 1 and moved[0].startswith("2-") and moved[0].endswith("-superseded")
  assert integrity.verify_step(os.path.join(aside, moved[0])) is None
  assert sorted(integrity.step_directories(tmp_path / "checkpoints")) == [1]


@contextlib.contextmanager
def _small_tmpfs(path, size="512k", read_only=False):
  """A size-limited (or read-only) tmpfs at ``path``, or None where mounting is not allowed."""
  os.makedirs(path, exist_ok=True)
  options = f"size={size}" + (",ro" if read_only else "")
  ok = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                      capture_output=True).returncode == 0
  try:
    yield path if ok else None
  finally:
    if ok:
      subprocess.run(["umount", str(path)], capture_output=True)


def test_a_failed_save_stops_with_one_line_and_keeps_the_last_complete_step(tmp_path, monkeypatch):
  with _small_tmpfs(tmp_path / "disk") as disk:
    if disk is None:  # no mount here: the same failure, injected
      disk = tmp_path / "disk"
      _saved(disk, [1])
      ckpt = Checkpointer(str(disk), every=1, keep=10)
      state = _tree(2, n=256 * 1024)
      monkeypatch.setattr(ckpt.manager, "save", lambda *a, **k: (_ for _ in ()).throw(
          OSError(errno.ENOSPC, "No space left on device", str(disk / "2"))))
    else:  # a 512 KiB disk: step 1 (about 260 KiB) fits, step 2 (4 MiB) does not
      _saved(disk, [1])
      ckpt = Checkpointer(str(disk), every=1, keep=10)
      state = _tree(2, n=1024 * 1024)
    with pytest.raises(SaveFailed) as failure:
      ckpt.save(2, state, _iterator(), {}, force=True)
      ckpt.confirm(2)
      ckpt.wait()
    line = error_line(failure.value)
    assert line.startswith(f"error: saving checkpoint step 2 to {disk}/2 failed: ")
    assert "the state needs about" in line and "MiB are free there" in line
    assert "The last complete checkpoint is step 1" in line and "\n" not in line
    with contextlib.suppress(Exception):
      ckpt.manager.close()
    assert integrity.choose_step(str(disk), report=lambda _: None).step == 1


def test_bad_workdirs_are_refused_before_anything_is_created(tmp_path):
  with pytest.raises(ValueError, match="--workdir is empty"):
    W.check_workdir("")
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(ValueError, match=f"--workdir={a_file} is a file"):
    W.check_workdir(str(a_file))
  with pytest.raises(ValueError, match="is a file, so the folder cannot be made"):
    W.check_workdir(str(a_file / "run"))
  with pytest.raises(FileNotFoundError, match="does not exist; give the workdir"):
    W.check_workdir(str(tmp_path / "missing"), must_exist=True)
  assert not (tmp_path / "missing").exists()
  W.check_workdir(str(tmp_path / "new" / "run"))  # fine, and still nothing created
  assert not (tmp_path / "new").exists()
  with _small_tmpfs(tmp_path / "ro", read_only=True) as ro:
    if ro is None:
      pytest.skip("cannot mount a read-only folder here (the other cases ran)")
    with pytest.raises(ValueError, match="is not writable"):
      W.check_workdir(str(ro / "run"))


def test_one_live_run_per_workdir_and_stale_locks_are_taken_over(tmp_path, monkeypatch):
  lock_file = tmp_path / "LOCK"
  holder = W.WorkdirLock(str(tmp_path))
  holder.acquire()
  record = json.loads(lock_file.read_text())
  assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
  with pytest.raises(W.WorkdirLocked, match=f"in use by pid {os.getpid()} on host "):
    W.WorkdirLock(str(tmp_path)).acquire()
  holder.release()
  assert not lock_file.exists()

  said = []
  gone = subprocess.Popen(["true"])
  gone.wait()
  lock_file.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
  taker = W.WorkdirLock(str(tmp_path), report=said.append)
  taker.acquire()
  assert f"pid {gone.pid} is no longer running" in said[0]
  taker.release()

  # An unreadable or empty LOCK was not written by a live run (locks are written whole).
  lock_file.write_text("")
  said.clear()
  taker = W.WorkdirLock(str(tmp_path), report=said.append)
  taker.acquire()
  assert "unreadable" in said[0] and json.loads(lock_file.read_text())["pid"] == os.getpid()
  taker.release()

  # Another host: judged by the heartbeat (the lock's age).
  lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
  with pytest.raises(W.WorkdirLocked, match="pid 1 on host elsewhere .*delete .*LOCK"):
    W.WorkdirLock(str(tmp_path)).acquire()
  old = time.time() - W.STALE_AFTER_S - 60
  os.utime(lock_file, (old, old))
  said.clear()
  taker = W.WorkdirLock(str(tmp_path), report=said.append)
  taker.acquire()
  assert "no heartbeat for" in said[0]
  taker.release()


def test_resuming_with_other_data_settings_is_refused_naming_the_field():
  saved = {"experiment": default_config().to_dict(), "processes": 1}
  same = {"experiment": default_config().to_dict(), "processes": 1}
  check_data_position(saved, same, "/w/checkpoints", 200)
  for field, value in (("seq_len", 128), ("batch_size", 8)):
    other = default_config()
    other.train[field] = value
    with pytest.raises(ValueError, match=f"config.train.{field}: saved .*init_from=/w/checkpoints/200"):
      check_data_position(saved, {"experiment": other.to_dict(), "processes": 1}, "/w/checkpoints", 200)
  other = default_config()
  other.data.packing = False
  with pytest.raises(ValueError, match="config.data.packing: saved True, now False"):
    check_data_position(saved, {"experiment": other.to_dict(), "processes": 1}, "/w", 1)
  with pytest.raises(ValueError, match="processes: saved 1, now 2"):
    check_data_position(saved, dict(same, processes=2), "/w", 1)


def test_a_failed_convert_leaves_no_partial_target(tmp_path, make_model, monkeypatch):
  from deepseek_jax import convert as convert_lib
  from deepseek_jax.interop import hf_checkpoint
  from deepseek_jax.interop.orbax_params import save_model

  source = tmp_path / "params"
  save_model(make_model(), str(source))
  real_save = hf_checkpoint.save_hf_checkpoint

  def disk_full(model, directory, **kwargs):
    os.makedirs(directory, exist_ok=True)
    (tmp_path / "hf" / "model-00001.safetensors").write_bytes(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))

  for existed in (False, True):
    target = tmp_path / "hf"
    if existed:
      target.mkdir()
    monkeypatch.setattr(hf_checkpoint, "save_hf_checkpoint", disk_full)
    with pytest.raises(OSError, match="No space left"):
      convert_lib.convert(from_orbax=str(source), to_hf=str(target))
    assert (target.exists() and not os.listdir(target)) if existed else not target.exists()
    monkeypatch.setattr(hf_checkpoint, "save_hf_checkpoint", real_save)
    assert "converted" in convert_lib.convert(from_orbax=str(source), to_hf=str(target))
    assert os.listdir(target)
    import shutil
    shutil.rmtree(target)


def test_a_parameters_checkpoint_is_sealed_and_verified_on_load(tmp_path, make_model):
  from deepseek_jax.interop.orbax_params import load_model, save_model

  step_dir = save_model(make_model(), str(tmp_path / "params"))
  assert integrity.verify_step(step_dir) is None
  load_model(str(tmp_path / "params"))
  _flip_bit(_largest_file(step_dir))
  with pytest.raises(integrity.CheckpointIntegrityError, match="no checkpoint in .* verifies"):
    load_model(str(tmp_path / "params"))


def test_an_hf_export_that_fails_leaves_no_staging_folder(tmp_path, make_model, monkeypatch):
  from deepseek_jax.interop import hf_checkpoint

  def full_disk(directory, plans, **kwargs):
    os.makedirs(directory)
    with open(os.path.join(directory, "model-00001-of-00002.safetensors"), "wb") as f:
      f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(hf_checkpoint, "write_checkpoint", full_disk)
  target = tmp_path / "hf"
  with pytest.raises(OSError) as failure:
    hf_checkpoint.save_hf_checkpoint(make_model(), str(target))
  assert failure.value.filename == str(target)
  assert error_line(failure.value) == (f"error: {target}: No space left on device; free space "
                                       "there and rerun")
  assert os.listdir(tmp_path) == []  # neither the target nor hf.partial-<pid>
