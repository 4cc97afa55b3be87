"""Checkpoints: orbax CheckpointManager holding the train state, the data iterator and the config,
each step sealed with checksums and verified before it is restored.

Each step directory holds ``state`` (every array of the TrainState, as nested dicts, restored
straight into its shardings), ``data`` (the grain iterator position of every process),
``config`` (the run's experiment config) and, once orbax has finished writing it and the run
has ``confirm``ed it, ``checksums.json`` (``interop/integrity.py``: bytes and SHA-256 of every
file). The trainer confirms step s when step s+1's loss and gradient (computed at step s's
parameters) are finite, so a sealed step is one that was both written intact and trainable; a
step whose parameters diverged is ``reject``ed (moved aside, never sealed). Saves are
asynchronous, every ``checkpoint.every`` steps; sealing hashes the files in a background
thread. Rotation keeps the newest ``checkpoint.keep`` steps and never deletes the newest sealed
step, nor any step without checksums (a step this run did not seal is never deleted).

A save that fails (disk full, permission denied) raises ``SaveFailed`` at the next step, with
the path, the reason, the bytes the state needs and the last complete step.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from typing import Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from deepseek_jax.cli import RunError, resolve_path
from deepseek_jax.interop import integrity
from deepseek_jax.interop.orbax_params import from_nested, to_nested

# ModelConfig fields that change how the model runs, not what it computes or stores.
EXECUTION_FIELDS = ("scan_layers", "remat_policy", "grouped_matmul", "dtype", "max_seq_len", "name")

# Experiment-config fields that define what the saved data position points at: resuming with
# another value would reinterpret it (a different batch shape, document order or source).
DATA_POSITION_FIELDS = ("seed", "train.seq_len", "train.batch_size", "data.source",
                        "data.corpus_documents", "data.corpus_seed", "data.text_glob",
                        "data.tokens_path", "data.sft_path", "data.tokenizer", "data.tokenizer_path",
                        "data.bos_token", "data.eos_token", "data.pad_token", "data.packing",
                        "data.packing_bins", "data.eval_every")


class SaveFailed(RunError):
  """Writing a checkpoint failed (disk full, read-only, permission): the run stops."""


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """A run's checkpoints in ``directory``: the train state, the data iterator position and the
  config of each saved step (orbax ``CheckpointManager``; asynchronous saves every ``every``
  steps), sealed with checksums once written, the newest ``keep`` kept (see the module doc).
  ``save`` never overwrites a step; ``choose`` picks the step to restore (verified);
  ``restore`` loads a step straight into the given shardings. ``create=False`` opens an
  existing directory without creating it (evaluate, sample)."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True,
               create: bool = True):
    self.directory = resolve_path(directory)
    self.keep = keep
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=None,
                                           enable_async_checkpointing=async_save, create=create,
                                           cleanup_tmp_directories=create)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    steps = integrity.step_directories(self.directory)
    self._sealed = sorted(s for s, d in steps.items() if integrity.has_manifest(d))
    self._unsealed: Optional[int] = None  # saved by this run, not yet sealed
    self._confirmed: set = set()
    self._sealer: Optional[threading.Thread] = None
    self._seal_error: Optional[BaseException] = None
    self._state_bytes = 0

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def sealed_steps(self) -> list[int]:
    """Steps with checksums (written by this run or found at start), oldest first."""
    return list(self._sealed)

  def choose(self, requested: Optional[int] = None, report=print,
             hint: str = "") -> integrity.Choice:
    """The step to restore: ``requested`` (verified), else the newest step that verifies
    (``integrity.choose_step``)."""
    return integrity.choose_step(self.directory, requested, report=report, hint=hint)

  def set_aside(self, steps, why: str):
    """Move ``steps`` out of the checkpoint directory (kept, not deleted) so this run can save
    those step numbers again. Returns the folder they went to."""
    steps = sorted(steps)
    aside = None
    if steps and jax.process_index() == 0:
      aside = integrity.set_aside(self.directory, steps, why=why)
    _barrier("deepseek_jax:set_aside")
    self.manager.reload()
    self._sealed = [s for s in self._sealed if s not in steps]
    return aside or f"{self.directory}-set-aside"

  def save(self, step: int, state, data_iterator, config: dict, *, force: bool = False) -> bool:
    """Save if the interval says so (or ``force``); an existing step is never overwritten.
    Finishes (and seals) the previous save first. Raises SaveFailed."""
    if step in self.manager.all_steps() or step in integrity.step_directories(self.directory):
      return False
    self._finish()
    self._state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                            for x in jax.tree.leaves(state))
    args = ocp.args.Composite(state=ocp.args.StandardSave(to_nested(state)),
                              data=grain.checkpoint.CheckpointSave(data_iterator),
                              config=ocp.args.JsonSave(config))
    try:
      saved = self.manager.save(step, args=args, force=force)
    except Exception as e:  # noqa: BLE001 (reported as one SaveFailed line)
      raise self._failed(step, e) from e
    if saved:
      self._unsealed = step
    return saved

  def poll(self) -> None:
    """Cheap; call once per step. Raises SaveFailed as soon as an asynchronous save has failed,
    and starts sealing a save that has finished."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise self._failed(self._unsealed, e) from e
    if (self._unsealed in self._confirmed and self._sealer is None
        and jax.process_index() == 0 and not self.manager.is_saving_in_progress()):
      step = self._unsealed
      self._sealer = threading.Thread(target=self._seal, args=(step,), daemon=True,
                                      name=f"seal-checkpoint-{step}")
      self._sealer.start()

  def _seal(self, step: int) -> None:
    try:
      integrity.write_manifest(os.path.join(self.directory, str(step)))
    except BaseException as e:  # noqa: BLE001 (re-raised by _finish in the main thread)
      self._seal_error = e

  def confirm(self, step: int) -> None:
    """The state saved at ``step`` is good to resume from (its loss and gradient are finite):
    it is sealed once written."""
    self._confirmed.add(step)

  def reject(self, step: int, why: str):
    """The state saved at ``step`` must not be resumed from: wait for its save, then move it
    aside unsealed (kept). Returns the folder it went to."""
    try:
      self.manager.wait_until_finished()
    except Exception:  # noqa: BLE001 (a failed save of a rejected step changes nothing)
      pass
    if self._unsealed == step:
      self._unsealed = None
    self._sealed = [s for s in self._sealed if s != step]
    return self.set_aside([step], why)

  def _finish(self) -> None:
    """Wait for the pending save, seal it if confirmed (else it stays unverified), rotate.
    Raises SaveFailed."""
    step = self._unsealed
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      self._unsealed = None
      raise self._failed(step, e) from e
    if step is None or step not in self._confirmed:
      self._unsealed = None
      if step is not None:
        self._rotate()
      return
    if jax.process_index() == 0:
      if self._sealer is None:
        self._seal(step)
      else:
        self._sealer.join()
    self._sealer, self._unsealed = None, None
    if self._seal_error is not None:
      error, self._seal_error = self._seal_error, None
      raise self._failed(step, error) from error
    _barrier("deepseek_jax:sealed")
    self._sealed.append(step)
    self._rotate()

  def _rotate(self) -> None:
    """Delete sealed steps beyond the newest ``keep``, never the newest sealed one."""
    if not self.keep:
      return
    newest = set(sorted(self.manager.all_steps())[-self.keep:])
    for step in self._sealed[:-1]:
      if step not in newest and step in self.manager.all_steps():
        self.manager.delete(step)
    self._sealed = [s for s in self._sealed if s in self.manager.all_steps()]

  def _failed(self, step: Optional[int], error: BaseException) -> SaveFailed:
    reason = (getattr(error, "strerror", None) or str(error) or type(error).__name__)
    reason = reason.strip().splitlines()[0]
    for known in ("No space left on device", "Read-only file system", "Permission denied",
                  "Disk quota exceeded"):
      if known.lower() in reason.lower():
        reason = known.lower()
    reason = reason[:300]
    need = ""
    if self._state_bytes:
      need = f"; the state needs about {self._state_bytes / 2**20:,.1f} MiB"
      try:
        need += f", {shutil.disk_usage(self.directory).free / 2**20:,.1f} MiB are free there"
      except OSError:
        pass
    last = self._sealed[-1] if self._sealed else None
    where = os.path.join(self.directory, str(step)) if step is not None else self.directory
    return SaveFailed(f"saving checkpoint step {step} to {where} failed: {reason}{need}. The "
                      f"last complete checkpoint is {'step ' + str(last) if last else 'none'}; "
                      "free space or fix the permissions, then rerun to resume")

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restore ``step`` into ``abstract_state`` (ShapeDtypeStructs with shardings) and, if given,
    move the data iterator to its saved position. Returns the restored state."""
    items = {"state": ocp.args.StandardRestore(to_nested(abstract_state))}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return from_nested(restored["state"], abstract_state)

  def wait(self):
    """Finish the pending save (sealed, rotated). Raises SaveFailed."""
    self._finish()

  def close(self):
    try:
      self._finish()
    finally:
      self.manager.close()


def check_compatible(saved: dict, current: dict, directory: str) -> None:
  """Refuse to resume a checkpoint of a different model (execution-only fields may differ)."""
  saved_model, current_model = saved.get("model_config", {}), current["model_config"]
  differing = sorted(k for k in set(saved_model) | set(current_model)
                     if k not in EXECUTION_FIELDS and saved_model.get(k) != current_model.get(k))
  if differing:
    detail = ", ".join(f"{k}: saved {saved_model.get(k)!r} vs now {current_model.get(k)!r}"
                       for k in differing[:6])
    raise ValueError(f"the checkpoints in {directory} belong to a different model ({detail}). "
                     "Use a new --workdir, or restore the original model settings.")


def _field(experiment: dict, dotted: str):
  node = experiment
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def check_data_position(saved: dict, current: dict, directory: str, step: int,
                        fields=DATA_POSITION_FIELDS, init_from: str = "train.init_from") -> None:
  """Refuse to resume when the saved data position would be reinterpreted: one of ``fields``
  (default ``DATA_POSITION_FIELDS``) or the number of processes differs. Raises ValueError
  naming the field and both fixes (restore it, or start fresh from the weights with
  ``init_from``, the config field that names a checkpoint to start from)."""
  old, new = saved.get("experiment", {}), current["experiment"]
  # A field missing from an older record predates it: it meant the default (empty).
  differing = [(f, _field(old, f), _field(new, f)) for f in fields
               if _field(old, f) != _field(new, f) and {_field(old, f), _field(new, f)}
               - {None, ""}]
  if saved.get("processes", current["processes"]) != current["processes"]:
    differing.append(("processes", saved["processes"], current["processes"]))
  if differing:
    detail = ", ".join(f"{'config.' if f != 'processes' else ''}{f}: saved {a!r}, now {b!r}"
                       for f, a, b in differing[:4])
    raise ValueError(
        f"cannot resume step {step} of {directory}: {detail}; the saved data position counts "
        "batches of the saved data settings. Resume with the saved values, or start a new "
        f"--workdir from these weights with --config.{init_from}={directory}/{step} "
        "(fresh optimizer and data)")


def config_record(config, model_cfg) -> dict:
  """What is stored beside each checkpoint: the experiment config, the resolved model and the
  number of processes (each saves its own data position)."""
  return {"experiment": json.loads(config.to_json_best_effort()),
          "model_config": model_cfg.to_dict(), "processes": jax.process_count()}
