"""Checkpoints: orbax CheckpointManager holding the train state, the data iterator and the config.

Each step directory holds ``state`` (every array of the TrainState, as nested dicts, restored
straight into its shardings), ``data`` (the grain iterator position of every process) and
``config`` (the run's experiment config). Saves are asynchronous, every ``checkpoint.every``
steps, keeping the last ``checkpoint.keep``. Restoring checks that the saved model matches the
configured one and refuses otherwise: a workdir is never reused for a different model.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import grain
import orbax.checkpoint as ocp

from deepseek_jax.interop.orbax_params import from_nested, to_nested

# ModelConfig fields that change how the model runs, not what it computes or stores.
EXECUTION_FIELDS = ("scan_layers", "remat_policy", "grouped_matmul", "dtype", "max_seq_len", "name")


class Checkpointer:
  """A run's checkpoints in ``directory``: the train state, the data iterator position and the
  config of each saved step (orbax ``CheckpointManager``; asynchronous saves every ``every``
  steps, the last ``keep`` kept). ``save`` never overwrites a step; ``restore`` loads a step
  straight into the given shardings. orbax's errors (a missing or corrupt step) propagate."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config: dict, *, force: bool = False) -> bool:
    """Save if the interval says so (or ``force``); an existing step is never overwritten."""
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(to_nested(state)),
                              data=grain.checkpoint.CheckpointSave(data_iterator),
                              config=ocp.args.JsonSave(config))
    return self.manager.save(step, args=args, force=force)

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
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
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


def config_record(config, model_cfg) -> dict:
  """What is stored beside each checkpoint: the experiment config and the resolved model."""
  return {"experiment": json.loads(config.to_json_best_effort()),
          "model_config": model_cfg.to_dict()}
