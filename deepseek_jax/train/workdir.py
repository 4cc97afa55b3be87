"""The workdir: checked before anything is created in it, and held by one run at a time.

``check_workdir`` refuses an empty path, a file, or a folder that cannot be written, before any
directory is made. ``WorkdirLock`` is ``<workdir>/LOCK`` (JSON: pid, host, start time), written whole and
linked into place atomically by the run's first process and refreshed by a heartbeat thread every
``HEARTBEAT_S``. A second run on a live workdir is refused, naming the holder. A lock is stale,
and taken over with a message, when its pid is gone on this host, when it is unreadable (a
live lock is never partial), or when its heartbeat is older than ``STALE_AFTER_S`` (a run killed on another host); it is removed when the run ends.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from typing import Callable, Optional

from deepseek_jax.cli import RunError, is_remote, resolve_path

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class WorkdirLocked(RunError):
  """Another live run holds the workdir."""


def check_workdir(workdir: str, *, must_exist: bool = False) -> None:
  """Raise ValueError (or FileNotFoundError when ``must_exist``) for a workdir that cannot
  work, naming it and the fix, before anything is created. Remote paths (``gs://``) pass."""
  if not workdir or not workdir.strip():
    raise ValueError("--workdir is empty; give the folder for checkpoints and metrics")
  if is_remote(workdir):
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--workdir={workdir} is a file, not a folder; give a folder path")
  if must_exist:
    if not os.path.isdir(path):
      raise FileNotFoundError(f"--workdir={workdir} does not exist; give the workdir of a "
                              "training run")
    return
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"--workdir={workdir}: {existing} is a file, so the folder cannot be made")
  if not _writable(existing):
    raise ValueError(f"--workdir={workdir}: {existing} is not writable (read-only or permission "
                     "denied); choose a writable folder")


def _writable(folder: str) -> bool:
  """A real write probe (os.access says yes to root on a read-only mount)."""
  probe = os.path.join(folder, f".deepseek-jax-write-test-{socket.gethostname()}-{os.getpid()}")
  try:
    with open(probe, "w"):
      pass
    os.remove(probe)
    return True
  except OSError:
    return False


def _link_or_create(staging: str, path: str) -> None:
  """Put ``staging``'s content at ``path``; FileExistsError if ``path`` exists. A hard link
  where the filesystem has them, else an exclusive create and a copy."""
  try:
    os.link(staging, path)
    return
  except FileExistsError:
    raise
  except OSError:
    pass
  with open(staging) as f:
    content = f.read()
  fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  with os.fdopen(fd, "w") as f:
    f.write(content)


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """``<workdir>/LOCK`` for the life of a run (a context manager; see the module doc).

  ``acquire`` raises WorkdirLocked naming the holder's pid, host and start time; ``report``
  receives the one line said when a stale lock is taken over."""

  def __init__(self, workdir: str, report: Callable[[str], None] = print):
    self.path = os.path.join(resolve_path(workdir), "LOCK")
    self.report = report
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self.held = False

  def _holder(self) -> Optional[dict]:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable or empty

  def _stale(self, holder: dict) -> Optional[str]:
    try:
      age = time.time() - os.path.getmtime(self.path)
    except FileNotFoundError:
      return "gone"
    if not holder:
      return "unreadable (locks are written whole, so no live run wrote it)"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
      if not _alive(holder["pid"]):
        return f"pid {holder['pid']} is no longer running"
      return None
    if age > STALE_AFTER_S:
      return f"no heartbeat for {age:.0f} s"
    return None

  def acquire(self) -> None:
    if is_remote(self.path):
      return  # no atomic create-if-absent on object stores: one writer is the user's to ensure
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    # Written whole under a private name, then linked into place (atomic, fails if LOCK exists):
    # a reader never sees a partial LOCK, and a full disk fails here, naming the path.
    staging = f"{self.path}.{socket.gethostname()}.{os.getpid()}"
    try:
      with open(staging, "w") as f:
        json.dump(record, f)
    except OSError as e:
      _remove(staging)
      raise OSError(e.errno, e.strerror, self.path) from e
    try:
      self._take(staging)
    finally:
      _remove(staging)

  def _take(self, staging: str) -> None:
    for _ in range(3):
      try:
        _link_or_create(staging, self.path)
      except FileExistsError:
        holder = self._holder()
        if holder is None:
          continue
        why = self._stale(holder)
        if why is None:
          raise WorkdirLocked(
              f"{os.path.dirname(self.path)} is in use by pid {holder.get('pid', '?')} on host "
              f"{holder.get('host', '?')} (since {holder.get('started', '?')}); wait for that "
              f"run to end or stop it, or use another --workdir. If it is dead, delete "
              f"{self.path}") from None
        self.report(f"taking over a stale lock {self.path} ({why})")
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      self.held = True
      self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock")
      self._thread.start()
      return
    raise WorkdirLocked(f"could not take {self.path}: other runs keep creating it")

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self) -> None:
    if not self.held:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      with open(self.path) as f:
        mine = json.load(f).get("pid") == os.getpid()
    except (OSError, ValueError):
      mine = False
    if mine:
      try:
        os.remove(self.path)
      except OSError as e:
        if e.errno != errno.ENOENT:
          raise
    self.held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
