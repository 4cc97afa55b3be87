"""Every failure of an entry point is one ``error:`` line (run_cli); entry points restart with
malloc on transparent huge pages (use_huge_pages)."""

import errno
import os
import subprocess
import sys

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


@pytest.mark.parametrize("environ, thp, glibc, expected", [
    ({}, "madvise", (2, 36), "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", (2, 35),
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),  # the user's tunables are kept
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36), None),  # user's choice
    ({"DEEPSEEK_JAX_HUGEPAGES": "0"}, "madvise", (2, 36), None),  # opted out
    ({}, "always", (2, 36), None),  # every large buffer gets huge pages already
    ({}, "never", (2, 36), None),
    ({}, "madvise", (2, 34), None),  # no such tunable before glibc 2.35
    ({}, "madvise", (), None),  # not glibc (musl, macOS)
])
def test_huge_page_environment_adds_the_malloc_tunable_only_where_it_changes_something(
    environ, thp, glibc, expected):
  env = cli.huge_page_environment(environ, thp, glibc)
  if expected is None:
    assert env is None
  else:
    assert env == {**environ, "GLIBC_TUNABLES": expected}


def test_an_entry_point_restarts_once_with_the_tunable_and_its_arguments(tmp_path):
  if cli.huge_page_environment({}) is None:
    pytest.skip("this host's malloc or kernel gains nothing from the tunable")
  script = tmp_path / "entry.py"
  script.write_text("import os, sys\nfrom deepseek_jax.cli import use_huge_pages\n"
                    "print('start', os.getpid(), flush=True)\nuse_huge_pages()\n"
                    "print('run', os.getpid(), sys.argv[1:], os.environ['GLIBC_TUNABLES'])\n")
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run([sys.executable, str(script), "--a=1", "b"], env=env, capture_output=True,
                       text=True, check=True).stdout.split("\n")
  pid = out[0].split()[1]
  assert out[:3] == [f"start {pid}", f"start {pid}",
                     f"run {pid} ['--a=1', 'b'] glibc.malloc.hugetlb=1"]


@pytest.mark.parametrize("how", ["stdin", "-c", "-m pdb", "script moved away"])
def test_a_process_that_cannot_be_restarted_as_started_is_left_alone(tmp_path, how):
  if cli.huge_page_environment({}) is None:
    pytest.skip("this host's malloc or kernel gains nothing from the tunable")
  code = ("import os\nfrom deepseek_jax.cli import use_huge_pages\nprint('start', flush=True)\n"
          "use_huge_pages()\nprint('run', os.environ.get('GLIBC_TUNABLES'))\n")
  script = tmp_path / "entry.py"
  script.write_text(code)
  command, stdin = {
      "stdin": ([sys.executable, "-"], code),
      "-c": ([sys.executable, "-c", code], None),
      "-m pdb": ([sys.executable, "-m", "pdb", str(script)], "c\nq\n"),  # the debugger's session
      # a wrapper that changes folder first: the relative script path no longer resolves
      "script moved away": ([sys.executable, "wrapper.py"], None),
  }[how]
  (tmp_path / "wrapper.py").write_text(
      "import os, runpy\nos.chdir('/')\nrunpy.run_path(%r, run_name='__main__')\n" % str(script))
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run(command, input=stdin, env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120).stdout
  assert out.count("start\n") == 1 and "run None" in out, out
