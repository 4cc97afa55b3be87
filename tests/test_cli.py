"""Every failure of an entry point is one ``error:`` line (run_cli)."""

import errno

import pytest

from deepseek_jax import cli


@pytest.mark.parametrize("exc, line", [
    (ValueError("config.train.steps: must be positive, got 0"),
     "error: config.train.steps: must be positive, got 0"),
    (cli.RunError("loss is not finite at step 3"), "error: loss is not finite at step 3"),
    (OSError(errno.ENOSPC, "No space left on device", "/ckpt/100/state"),
     "error: /ckpt/100/state: No space left on device; free space there and rerun"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/workdir"),
     "error: /ro/workdir: Permission denied"),
    (KeyError("next_index"), "error: unexpected KeyError: 'next_index' (rerun with --verbosity=1"),
    (ZeroDivisionError("division by zero"), "error: unexpected ZeroDivisionError: division by zero"),
])
def test_each_failure_is_one_error_line_and_exit_code_1(capsys, exc, line):
  def fail():
    raise exc

  with pytest.raises(SystemExit) as stop:
    cli.run_cli(fail)
  assert stop.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith(line) and err.count("\n") == 1 and "Traceback" not in err


def test_a_huge_library_message_is_cut_to_one_readable_line(capsys):
  def fail():
    raise ValueError("tree structures do not match: " + "ShapeDtypeStruct(shape=(64,)), " * 900)

  with pytest.raises(SystemExit):
    cli.run_cli(fail)
  err = capsys.readouterr().err
  assert err.startswith("error: tree structures do not match") and err.count("\n") == 1
  assert len(err) < cli.MAX_ERROR_CHARS + 100 and "more characters; --verbosity=1" in err


def test_an_absent_tpu_is_left_out_only_when_libtpu_is_installed_and_no_choice_was_made(
    monkeypatch):
  import glob
  import importlib.util
  installed = {"libtpu"}
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: name in installed or None)
  monkeypatch.setattr(glob, "glob", lambda pattern: [])
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  assert cli.platforms_without_absent_tpu() == "cpu"
  installed.add("jax_cuda12_plugin")
  assert cli.platforms_without_absent_tpu() == "cuda,cpu"
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")  # the user's choice wins
  assert cli.platforms_without_absent_tpu() is None
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/accel0"])  # a TPU host
  assert cli.platforms_without_absent_tpu() is None
  installed.clear()  # no libtpu: nothing to do
  monkeypatch.setattr(glob, "glob", lambda pattern: [])
  assert cli.platforms_without_absent_tpu() is None
