"""Command-line plumbing shared by every entry point (experiments/*.py, python -m
deepseek_jax.convert): XLA flags and CPU device splitting set before JAX starts, absl flag
parsing that reports a misspelt ``--config.*`` override in one line, and ``run_cli``, which turns
bad input into one ``error:`` line instead of a traceback. Imports nothing else of deepseek_jax.
"""

from __future__ import annotations

import ast
import errno
import os
import sys
from typing import Optional

import jax


def is_remote(path) -> bool:
  """Whether ``path`` names an object store (``gs://``, ``s3://``: anything with a scheme),
  read and written through ``etils.epath`` rather than the local file system."""
  return "://" in str(path)


def resolve_path(path) -> str:
  """``path`` made absolute, unless it is remote (``os.path.abspath("gs://b/run")`` would be
  the local folder ``<cwd>/gs:/b/run``)."""
  return str(path) if is_remote(path) else os.path.abspath(path)


class RunError(RuntimeError):
  """A run stopped for a reason the user can act on (``run_cli`` prints it as one line)."""


# XLA:CPU's YNNPACK fusions run our training step ~20% slower (small preset, 2-core EPYC,
# jax 0.10.2 and 0.11.2); the flag only affects the CPU backend.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def set_cpu_xla_flags() -> None:
  """Append CPU_XLA_FLAGS to XLA_FLAGS (before the first JAX computation); a flag the user
  already set wins."""
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in current]
  os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


# glibc's malloc gives buffers above its mmap threshold back to the kernel when they are freed, so
# XLA:CPU's large temporaries are fresh 4 KiB pages again on every step: ~200k page faults and a
# quarter of the CPU time in the kernel for one small-preset train step (2-core EPYC). With this
# tunable (glibc >= 2.35) malloc asks for transparent huge pages for them, 2 MiB per fault: the
# step runs ~20% faster. It only matters where THP is in "madvise" mode (the usual default).
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
HUGEPAGE_OPT_OUT = "DEEPSEEK_JAX_HUGEPAGES"  # =0: do not restart with the tunable


def _thp_mode() -> str:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"; "" if unknown)."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      text = f.read()
  except OSError:
    return ""
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else ""


def _glibc_version() -> tuple[int, ...]:
  """(major, minor) of the C library when it is glibc, else ()."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (ValueError, OSError, AttributeError):
    return ()
  return tuple(int(v) for v in version.split(".")[:2]) if name == "glibc" else ()


def huge_page_environment(environ, thp_mode: Optional[str] = None,
                          glibc: Optional[tuple[int, ...]] = None) -> Optional[dict]:
  """The environment to restart an entry point with so that malloc uses transparent huge pages
  (``HUGEPAGE_TUNABLE`` appended to GLIBC_TUNABLES), or None when it would change nothing: THP
  not in madvise mode, not glibc >= 2.35, the tunable already set, or the user opted out with
  DEEPSEEK_JAX_HUGEPAGES=0 (or false / no / off). ``thp_mode`` and ``glibc`` default to this
  host's."""
  thp_mode = _thp_mode() if thp_mode is None else thp_mode
  glibc = _glibc_version() if glibc is None else glibc
  opted_out = environ.get(HUGEPAGE_OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off")
  if thp_mode != "madvise" or glibc < (2, 35) or opted_out:
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (tunables, HUGEPAGE_TUNABLE) if t)}


def restartable() -> bool:
  """Whether this process can be restarted as it was started: a script file run by the
  interpreter (``python [options] script.py args``, the script still found from the current
  folder), not code from stdin, ``-c``, ``-m``, a debugger, a tracer or an IPython / Jupyter
  session (whose state a restart would lose)."""
  script, argv = sys.argv[0] if sys.argv else "", getattr(sys, "orig_argv", [])
  if sys.platform != "linux" or script in ("", "-", "-c") or script not in argv[1:]:
    return False
  if "-m" in argv[1:argv.index(script, 1)]:  # python -m pdb / cProfile / debugpy script.py
    return False
  if not os.path.isfile(script) or sys.gettrace() is not None:
    return False
  ipython = sys.modules.get("IPython")  # imported by libraries too: is a session running?
  return not (ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None)


def use_huge_pages() -> None:
  """Restart this process with malloc on transparent huge pages (``huge_page_environment``), for
  the entry points: call it first in ``if __name__ == "__main__":``. GLIBC_TUNABLES is read only
  when a process starts, hence the restart (same interpreter and arguments, same pid). Does
  nothing when the tunable would change nothing or the process is not ``restartable``. A
  profiler that follows the pid (py-spy) loses it at the restart: set
  DEEPSEEK_JAX_HUGEPAGES=0, or GLIBC_TUNABLES=glibc.malloc.hugetlb=1 yourself, when profiling."""
  if not restartable():
    return
  argv = sys.orig_argv
  env = huge_page_environment(os.environ)
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def skip_absent_tpu() -> Optional[str]:
  """With libtpu installed (the test extra) on a host without TPU chips, JAX would try to start
  a TPU backend in every run and print a screenful of libtpu errors. Unless the user chose
  ``JAX_PLATFORMS``, leave TPU out: ``cuda,cpu`` with a CUDA plugin installed, else ``cpu``.
  Call before the first JAX computation. Returns what was set, or None."""
  platforms = platforms_without_absent_tpu()
  if platforms:
    jax.config.update("jax_platforms", platforms)
  return platforms


def platforms_without_absent_tpu() -> Optional[str]:
  """The decision of ``skip_absent_tpu`` (no side effect)."""
  import glob
  import importlib.util
  if os.environ.get("JAX_PLATFORMS") or not importlib.util.find_spec("libtpu"):
    return None
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return None  # a TPU host
  cuda = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
  return "cuda,cpu" if cuda else "cpu"


def set_cpu_devices(n: int) -> None:
  """Ask XLA:CPU for ``n`` host devices (before the first JAX computation; 0 = leave it).
  Raises ValueError when XLA_FLAGS already asks for another count."""
  if n <= 0:
    return
  flag = "--xla_force_host_platform_device_count"
  current = os.environ.get("XLA_FLAGS", "")
  if flag in current:
    if f"{flag}={n}" not in current.split():
      raise ValueError(f"config.cpu_devices={n} conflicts with {flag} in XLA_FLAGS="
                       f"{current!r}; remove one of them")
    return
  os.environ["XLA_FLAGS"] = f"{current} {flag}={n}".strip()


def check_cpu_devices(n: int) -> None:
  """Raises ValueError when ``config.cpu_devices=n`` came too late: JAX already started with
  another number of CPU devices."""
  if n > 0 and jax.default_backend() == "cpu" and jax.device_count() != n * jax.process_count():
    raise ValueError(f"config.cpu_devices={n} but JAX started with {jax.device_count()} CPU "
                     "devices: it was initialised before the config was read; set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={n} in the environment instead")


def parse_flags(argv):
  """absl's flag parser for the entry points (``app.run(main, flags_parser=parse_flags)``): a
  misspelt ``--config.a.b`` raises deep inside ml_collections; report it in one line."""
  from absl import app
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    detail = str(e.args[0] if e.args else e)
    for _ in range(2):  # ml_collections nests repr()s of the KeyError message
      try:
        detail = str(ast.literal_eval(detail))
      except (ValueError, SyntaxError):
        break
    detail = detail.replace("?\n", "? ").replace("\n", "; ")
    leaf = detail.split(";")[0].strip().strip("'\"")
    given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
             and leaf in a.split("=")[0].split(".")]
    where = f" ({given[0]})" if given else ""
    sep = " " if detail.endswith("?") else "; "
    print(f"error: unknown config field in a --config.* override{where}: {detail}{sep}the fields "
          "are those of the config file's get_config (defaults: deepseek_jax/train/config.py, "
          "deepseek_jax/rl/config.py for RL, deepseek_jax/rl/pipeline.py for the R1 pipeline)", file=sys.stderr, flush=True)
    sys.exit(1)


def error_line(e: BaseException) -> str:
  """The one line a failed run prints for ``e``.

  Bad input (ValueError and its kin, missing or existing files, RunError) already says what
  and how to fix it; an OSError names its path and the system's reason (disk full, permission
  denied, ...); anything else is unexpected and says how to see the traceback.
  """
  if isinstance(e, (ValueError, FileNotFoundError, FileExistsError, RunError)):
    return _capped(f"error: {e}".replace("\n", "; "))
  if isinstance(e, OSError):
    where = f"{e.filename}: " if e.filename else ""
    reason = e.strerror or str(e)
    hint = "; free space there and rerun" if e.errno == errno.ENOSPC else ""
    return _capped(f"error: {where}{reason}{hint}")
  first = (str(e).strip().splitlines() or [""])[0]
  return _capped(f"error: unexpected {type(e).__name__}: {first}") + (
      " (rerun with --verbosity=1 to see the traceback)")


MAX_ERROR_CHARS = 600


def _capped(line: str) -> str:
  """A library's message can list a whole pytree; one line stays readable."""
  if len(line) <= MAX_ERROR_CHARS:
    return line
  return line[:MAX_ERROR_CHARS] + f" ... [{len(line) - MAX_ERROR_CHARS} more characters; " \
      "--verbosity=1 shows all]"


def _is_closed_loop_noise(exc) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _quiet_background_noise() -> None:
  """After a failed asynchronous save, tensorstore's pending writes call back into orbax's
  already-closed asyncio loop and print "RuntimeError: Event loop is closed" dozens of times
  (harmless: the save has failed and is reported in one line). Those, and only those, are
  dropped."""
  previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(kind, value, tb):
    if not _is_closed_loop_noise(value):
      previous_except(kind, value, tb)

  def unraisablehook(info):
    if not _is_closed_loop_noise(info.exc_value):
      previous_unraisable(info)

  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def run_cli(fn, *args, **kwargs):
  """Run an entry point: any failure ends the process with exit code 1 and one ``error:`` line
  on stderr (``error_line``) instead of a traceback, Ctrl-C outside a training loop with 130
  and one line; ``--verbosity=1`` (absl's debug level) lets the traceback through."""
  import logging
  set_cpu_xla_flags()
  skip_absent_tpu()
  from absl import flags, logging as absl_logging
  if flags.FLAGS.is_parsed() and not flags.FLAGS["verbosity"].present:
    # Library logs off (orbax writes ~50 INFO lines per checkpoint, and logs a traceback for
    # a failed save that the run reports in one line); --verbosity=0 turns them on.
    absl_logging.set_verbosity(absl_logging.FATAL)
    logging.getLogger().setLevel(logging.CRITICAL)
  if not (flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1):
    _quiet_background_noise()
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # noqa: BLE001 (one line for every failure; see error_line)
    if flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1:
      raise
    print(error_line(e), file=sys.stderr, flush=True)
    sys.exit(1)
  except KeyboardInterrupt:
    if flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1:
      raise
    print("interrupted (Ctrl-C) outside a training loop (or by a second Ctrl-C): nothing was "
          "being trained, so nothing new was saved; the checkpoints already saved are kept, "
          "rerun to continue from them", file=sys.stderr, flush=True)
    sys.exit(130)
