"""Checkpoint integrity: a SHA-256 per file of every saved step, verified before it is restored.

Every step directory that deepseek-jax writes (``<root>/<step>/``, a training workdir's
``checkpoints/`` or a parameters checkpoint) gets a ``checksums.json`` once orbax has finished
it: the byte count and SHA-256 of each file below the step. ``verify_step`` re-reads the files
and names the first one that is missing, truncated, grown or changed. A step without the file
(an interrupted seal, or a step written before checksums existed) is *unverified*: it is never
restored silently, only when asked for by number.

``choose_step`` picks what a run reads: the requested step (which must verify), or the newest
step that verifies, saying which newer steps were passed over and why. Nothing here deletes a
step; ``set_aside`` moves steps out of the way (into ``<root>-set-aside/``) when a run must
write over their step numbers.

Paths may be local or any ``etils.epath`` location (``gs://...``), as orbax's are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Callable, Optional

from etils import epath

MANIFEST = "checksums.json"
_CHUNK = 1 << 22  # 4 MiB reads


class CheckpointIntegrityError(ValueError):
  """No step can be read as requested (raised before anything is restored or compiled)."""


def step_directories(root) -> dict[int, epath.Path]:
  """{step: directory} of every ``<root>/<int>`` folder (finished or not, empty included)."""
  root = epath.Path(root)
  if not root.is_dir():
    return {}
  return {int(p.name): p for p in root.iterdir() if p.name.isdigit() and p.is_dir()}


def _digest(path: epath.Path) -> tuple[int, str]:
  sha, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      sha.update(chunk)
      size += len(chunk)
  return size, sha.hexdigest()


def _files(step_dir: epath.Path) -> list[str]:
  """Every file below ``step_dir`` (relative paths, sorted), the manifest excepted."""
  found, pending = [], [step_dir]
  while pending:
    for p in pending.pop().iterdir():
      if p.is_dir():
        pending.append(p)
      elif p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}"):
        found.append(str(p.relative_to(step_dir)))
  return sorted(found)


def write_manifest(step_dir) -> dict:
  """Hash every file below ``step_dir`` and write ``checksums.json`` beside them (through a
  temporary name, so a reader sees the whole file or none). Returns the manifest."""
  step_dir = epath.Path(step_dir)
  files = {}
  for rel in _files(step_dir):
    size, sha = _digest(step_dir / rel)
    files[rel] = {"bytes": size, "sha256": sha}
  manifest = {"format": 1, "algorithm": "sha256", "written": time.time(), "files": files}
  tmp = step_dir / f".{MANIFEST}.tmp"
  tmp.write_text(json.dumps(manifest, indent=1))
  tmp.rename(step_dir / MANIFEST)
  return manifest


def has_manifest(step_dir) -> bool:
  return (epath.Path(step_dir) / MANIFEST).exists()


def verify_step(step_dir) -> Optional[str]:
  """None when every file of the step has the bytes it was saved with; otherwise the reason,
  naming the file (``state/d/4a5e...: checksum mismatch``, ``...: truncated to 10 of 204
  bytes``, ``no checksums.json ...``, ``empty step directory``)."""
  step_dir = epath.Path(step_dir)
  if not step_dir.is_dir():
    return "missing"
  manifest_path = step_dir / MANIFEST
  if not manifest_path.exists():
    if not _files(step_dir):
      return "empty step directory"
    return (f"unverified: no {MANIFEST} (the run stopped before sealing it, or it was written "
            "before checksums existed)")
  try:
    manifest = json.loads(manifest_path.read_text())
    files = manifest["files"]
    assert isinstance(files, dict) and files, "no files listed"
  except Exception as e:  # noqa: BLE001 (any damage to the manifest is a verification failure)
    return f"{MANIFEST} is unreadable ({type(e).__name__}: {str(e)[:80]})"
  for rel, want in sorted(files.items()):
    path = step_dir / rel
    if not path.exists():
      return f"{rel}: missing"
    size, sha = _digest(path)
    if size != want["bytes"]:
      what = "truncated to" if size < want["bytes"] else "grown to"
      return f"{rel}: {what} {size} of {want['bytes']} bytes"
    if sha != want["sha256"]:
      return f"{rel}: checksum mismatch (the bytes changed after they were saved)"
  return None


def is_unverified(reason: Optional[str]) -> bool:
  """The step has no checksums (as opposed to checksums that do not match)."""
  return bool(reason) and reason.startswith("unverified")


@dataclasses.dataclass(frozen=True)
class Choice:
  """What ``choose_step`` decided: the step to read (None: no step at all) and the newer steps
  it passed over, {step: reason}."""

  step: Optional[int]
  skipped: dict


def choose_step(root, requested: Optional[int] = None, *,
                report: Callable[[str], None] = print, hint: str = "") -> Choice:
  """The step to restore from ``root``.

  ``requested`` (an int, 0 included) must exist and verify (a step without checksums is
  accepted with a warning: asking for it by number is the way to read one); otherwise the newest step that
  verifies, reporting each newer step passed over in one line (``hint`` is added to the error
  when none verifies: the caller's own way out). Raises FileNotFoundError for a
  requested step that does not exist and CheckpointIntegrityError when the requested step, or
  every step, fails verification.
  """
  steps = step_directories(root)
  where = str(root)
  if requested is not None:
    if requested not in steps:
      raise FileNotFoundError(f"no checkpoint at step {requested} in {where}; saved steps: "
                              f"{sorted(steps) or 'none'}")
    problem = verify_step(steps[requested])
    if problem and not is_unverified(problem):
      raise CheckpointIntegrityError(
          f"checkpoint step {requested} in {where} fails verification: {problem}; choose "
          f"another step (saved: {sorted(steps)})")
    if problem:
      report(f"warning: step {requested} has no {MANIFEST}; restoring it unverified")
    return Choice(requested, {})
  skipped = {}
  for step in sorted(steps, reverse=True):
    problem = verify_step(steps[step])
    if problem is None:
      if skipped:
        report(f"using step {step}, the newest checkpoint that verifies")
      return Choice(step, skipped)
    skipped[step] = problem
    report(f"warning: checkpoint step {step} in {where} is not used: {problem} (not deleted)")
  if skipped:
    unverified = sorted(s for s, why in skipped.items() if is_unverified(why))
    ways = ([f"--step=N reads a step without checksums ({unverified})"] if unverified else [])
    ways += [hint] if hint else []
    raise CheckpointIntegrityError(
        f"no checkpoint in {where} verifies (steps {sorted(skipped)}); "
        + "; ".join(ways + ["or use a new --workdir"]))
  return Choice(None, {})


def set_aside(root, steps, *, why: str) -> Optional[epath.Path]:
  """Move step directories out of ``root`` into ``<root>-set-aside/<step>-<time>-<why>`` (so a
  run can write those step numbers again) without deleting anything. Returns the folder."""
  if not steps:
    return None
  root = epath.Path(root)
  aside = root.parent / f"{root.name}-set-aside"
  aside.mkdir(parents=True, exist_ok=True)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for step in sorted(steps):
    (root / str(step)).rename(aside / f"{step}-{stamp}-{why}")
  return aside
