"""Model weights in our orbax checkpoint layout, without optimizer state.

A parameters checkpoint is what the trainer writes minus the optimizer, the step counter and
the data position: ``DIR/checkpoints/<step>/state`` holds ``{"params", "model_state"}``,
``DIR/checkpoints/<step>/config`` the ``model_config`` and ``checksums.json`` the integrity
record. ``load_model`` reads these out of either kind (a training workdir or a parameters
checkpoint, or one step directory of either), verifying the step first and restoring only the
weights.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from deepseek_jax.cli import resolve_path
from deepseek_jax.config import ModelConfig
from deepseek_jax.model.execution import Execution, resolve_execution
from deepseek_jax.model.transformer import DeepSeekModel, abstract_model
from deepseek_jax.interop import integrity, require_new_directory
from deepseek_jax.parallel.partitioning import placement

def _key(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def to_nested(tree) -> dict:
  """Any pytree -> nested dicts of its arrays, keyed by path (orbax-friendly)."""
  nested: dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    node = nested
    for entry in path[:-1]:
      node = node.setdefault(_key(entry), {})
    node[_key(path[-1])] = leaf
  return nested


def from_nested(nested: dict, like):
  """Inverse of to_nested: rebuild a pytree shaped like ``like``."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  leaves = []
  for path, _ in paths:
    node = nested
    for entry in path:
      node = node[_key(entry)]
    leaves.append(node)
  return jax.tree_util.tree_unflatten(treedef, leaves)


_SPLIT = (nnx.Param, ...)  # params, then everything else (router biases)


def checkpoint_root(directory: str) -> str:
  """The folder holding step directories: ``DIR/checkpoints`` of a workdir, else ``DIR``."""
  nested = os.path.join(directory, "checkpoints")
  return resolve_path(nested if epath.Path(nested).is_dir() else directory)


def resolve_checkpoint(directory: str, step: Optional[int] = None, report=print) -> tuple[str, int]:
  """(root, step) to read from ``directory``: a training workdir, a parameters checkpoint, or
  one step directory of either (``.../checkpoints/200``, which names the step). ``step``
  (0 included) must exist and verify; by default the newest step that verifies
  (``integrity.choose_step``, which reports steps passed over). Raises FileNotFoundError
  (nothing there, or no such step) and integrity.CheckpointIntegrityError."""
  directory = resolve_path(directory)
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f"no checkpoint directory at {directory}")
  name, parent = os.path.basename(directory), os.path.dirname(directory)
  if name.isdigit() and step is None and epath.Path(directory, "state").is_dir():
    directory, step = parent, int(name)
  root = checkpoint_root(directory)
  choice = integrity.choose_step(root, step, report=report)
  if choice.step is None:
    raise FileNotFoundError(f"no checkpoint in {root}; it holds no step directories")
  return root, choice.step


def _manager(directory: str, create: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(create=create, enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options)


def save_model(model: DeepSeekModel, directory: str, *, step: int = 0,
               extra_config: Optional[dict] = None) -> str:
  """Write ``model`` as a parameters checkpoint at ``DIR/checkpoints/<step>``; refuses a
  non-empty ``directory`` (nothing is overwritten). Returns the step directory."""
  require_new_directory(directory)
  _, params, rest = nnx.split(model, *_SPLIT)
  root = os.path.join(resolve_path(directory), "checkpoints")
  manager = _manager(root, create=True)
  record = {"model_config": model.config.to_dict(), **(extra_config or {})}
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(to_nested({"params": params, "model_state": rest})),
      config=ocp.args.JsonSave(record)))
  manager.wait_until_finished()
  manager.close()
  integrity.write_manifest(os.path.join(root, str(step)))
  return os.path.join(root, str(step))


def saved_record(step_dir: str) -> dict:
  """The config record saved beside a step (``model_config``, and for training runs the
  ``experiment`` config)."""
  root, step = os.path.dirname(resolve_path(step_dir)), int(os.path.basename(step_dir))
  manager = _manager(root)
  try:
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  finally:
    manager.close()


def load_model(directory: str, *, step: Optional[int] = None, mesh: Optional[Mesh] = None,
               rules: str = "fsdp", execution: Optional[Execution] = None,
               config: Optional[ModelConfig] = None, verified: bool = False) -> DeepSeekModel:
  """The model saved in a training workdir or a parameters checkpoint (latest step by default),
  restored straight into its shardings (``mesh``) or onto the first device. ``execution``:
  as ``load_hf_checkpoint``'s. ``config``: the model to restore into (default: the saved
  one; the caller checks they agree). The step is verified first (``resolve_checkpoint``;
  ``verified=True``: the caller has, and ``directory`` is the step folder). Raises
  FileNotFoundError for a missing directory or step, integrity.CheckpointIntegrityError for a
  step whose files changed, and ValueError for a checkpoint without a model_config."""
  if verified:
    root, step = os.path.dirname(resolve_path(directory)), int(os.path.basename(directory))
  else:
    root, step = resolve_checkpoint(directory, step)
  record = saved_record(os.path.join(root, str(step)))
  if "model_config" not in record:
    raise ValueError(f"{root}/{step} has no model_config; it was not written by deepseek-jax")
  cfg = config or ModelConfig(**record["model_config"])
  execution = execution or resolve_execution(cfg, mesh, expert_parallel=False)
  graphdef, params, rest = nnx.split(abstract_model(cfg, execution), *_SPLIT)
  shardings = (placement(params, mesh, rules), placement(rest, mesh, rules))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        (params, rest), shardings)
  # A run whose state holds more than one model (RL: policy, reference, value) names the
  # subtree holding the model's weights in its record ("weights_under": "policy").
  under = record.get("weights_under")
  like = {"params": target[0], "model_state": target[1]}
  nested = to_nested({under: like} if under else like)
  handler = ocp.PyTreeCheckpointer()
  restored = handler.restore(
      os.path.join(root, str(step), "state"),
      args=ocp.args.PyTreeRestore(item=nested, restore_args=ocp.checkpoint_utils.construct_restore_args(nested),
                                  partial_restore=True))
  state = from_nested(restored[under] if under else restored, like)
  return nnx.merge(graphdef, state["params"], state["model_state"])
