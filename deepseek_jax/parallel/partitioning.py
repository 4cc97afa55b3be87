"""Sharding as data: logical axis names -> mesh axes, chosen by rule-set name.

Every parameter carries logical axis names (``nnx.Param(..., axes=("embed", "mlp"))``); layer
stacks add a leading "layers" axis. A rule set maps each logical name to a mesh axis (or a
tuple of them, or None = replicated). The same table places parameters, optimizer moments and
the batch. A dimension that its mesh axes do not divide is replicated instead, and reported.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepseek_jax.parallel.mesh import BATCH_AXES

Rules = Mapping[str, Any]

_SHARED = {"batch": BATCH_AXES, "length": None, "layers": None, "norm": None, "q_lora": None,
           "kv_lora": None, "head_dim": None}

RULE_SETS: dict[str, Rules] = {
    # ZeRO-3 style: d_model split over fsdp, experts over expert, heads / FFN over tensor.
    "fsdp": {**_SHARED, "embed": "fsdp", "vocab": "tensor", "heads": "tensor",
             "kv_heads": "tensor", "mlp": "tensor", "expert": "expert", "expert_mlp": "tensor"},
    # No weight sharding on d_model: tensor + expert parallelism only (Megatron-like).
    "tensor": {**_SHARED, "embed": None, "vocab": "tensor", "heads": "tensor",
               "kv_heads": "tensor", "mlp": "tensor", "expert": "expert", "expert_mlp": "tensor"},
    # Pure data parallelism: every weight replicated.
    "replicated": {**_SHARED, "embed": None, "vocab": None, "heads": None, "kv_heads": None,
                   "mlp": None, "expert": None, "expert_mlp": None},
}


def get_rules(name: str) -> Rules:
  if name not in RULE_SETS:
    raise ValueError(f"partitioning rules {name!r} unknown; choose one of {sorted(RULE_SETS)}")
  return RULE_SETS[name]


def logical_to_spec(axes: Sequence[Optional[str]], rules: Rules, mesh: Mesh,
                    shape: Optional[Sequence[int]] = None, name: str = "") -> PartitionSpec:
  """PartitionSpec for logical ``axes``; each mesh axis is used at most once per array."""
  used: set[str] = set()
  spec = []
  for dim, logical in enumerate(axes):
    if logical is None:
      spec.append(None)
      continue
    if logical not in rules:
      raise ValueError(f"logical axis {logical!r} of {name or 'an array'} has no rule; "
                       f"known: {sorted(rules)}")
    target = rules[logical]
    mesh_axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
    ways = 1
    for a in mesh_axes:
      ways *= mesh.shape[a]
    if shape is not None and mesh_axes and shape[dim] % ways:
      logging.info("replicating dim %d (%s=%d) of %s: not divisible by %s", dim, logical,
                   shape[dim], name, mesh_axes)
      mesh_axes = ()
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _variable_axes(variable: nnx.Variable) -> tuple:
  axes = tuple(variable.get_metadata().get("axes", ()))
  extra = len(variable.shape) - len(axes)  # stacked layers (and replicated-by-default leaves)
  return ("layers",) * extra + axes if axes else (None,) * len(variable.shape)


def state_shardings(state, mesh: Mesh, rules: Rules):
  """The state's tree with each Variable holding its NamedSharding (same structure as the
  state, so it serves as jit in/out shardings and as orbax restore targets)."""

  def one(path, variable):
    spec = logical_to_spec(_variable_axes(variable), rules, mesh, variable.shape,
                           jax.tree_util.keystr(path))
    return variable.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def placement(state, mesh: Optional[Mesh] = None, rules: str = "fsdp"):
  """``state_shardings`` under the named ``rules`` with a mesh; every leaf on the first device
  without one."""
  if mesh is not None:
    return state_shardings(state, mesh, get_rules(rules))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda v: v.replace(device), state, is_leaf=_is_variable)


def tree_shardings_like(tree, params, param_shardings, mesh: Mesh):
  """Shardings for a tree (optimizer state) whose subtrees may mirror ``params``: those get
  the parameter shardings, every other leaf is replicated."""
  params_def = jax.tree.structure(params)
  replicated = NamedSharding(mesh, PartitionSpec())

  def visit(node):
    if jax.tree.structure(node) == params_def:
      return param_shardings
    return jax.tree.map(lambda _: replicated, node)

  return jax.tree.map(visit, tree, is_leaf=lambda n: jax.tree.structure(n) == params_def)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
  """[batch, length, ...] arrays: batch over the batch axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))
